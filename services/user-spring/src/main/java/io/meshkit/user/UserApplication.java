package io.meshkit.user;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;

/**
 * user-spring: {@code meshkit.user.v1.UserService} on the Rust user-service's
 * {@code users} table, answering as the Rust service does. Settings come from the
 * same environment variables ({@code MESHKIT_DATABASE_URL}, {@code MESHKIT_SERVER_LISTEN});
 * see application.properties.
 */
@SpringBootApplication
public class UserApplication {
    public static void main(String[] args) {
        SpringApplication.run(UserApplication.class, args);
    }
}
