package io.meshkit.spring;

import java.util.HashMap;
import java.util.Map;

import org.springframework.boot.EnvironmentPostProcessor;
import org.springframework.boot.SpringApplication;
import org.springframework.core.Ordered;
import org.springframework.core.env.ConfigurableEnvironment;
import org.springframework.core.env.MapPropertySource;

/**
 * Maps the settings a Rust service takes onto spring-grpc's, so that a Java
 * service starts with the same environment: {@code meshkit.server.listen}
 * ({@code MESHKIT_SERVER_LISTEN=host:port}) becomes spring.grpc.server.address,
 * {@code meshkit.server.drain-timeout-ms} the server's shutdown-grace-period
 * (how long in-flight calls get once it stops accepting), and
 * {@code meshkit.server.advertise} (the Rust name) meshkit.registry.advertise.
 * It also turns spring-grpc's health service on outright: by default
 * spring-grpc enables it only when it sees a BindableService bean while it
 * parses its configuration, which misses services declared as {@code @Bean}
 * methods; every meshkit instance serves grpc.health.v1.Health.
 * Added last, so an explicit spring.grpc.* setting wins. Runs after the
 * application's own properties files are loaded (lowest precedence order).
 */
public class MeshkitEnvironmentPostProcessor implements EnvironmentPostProcessor, Ordered {

    static final String SOURCE = "meshkit";

    @Override
    public void postProcessEnvironment(ConfigurableEnvironment environment, SpringApplication application) {
        Map<String, Object> mapped = new HashMap<>();
        String listen = environment.getProperty("meshkit.server.listen");
        if (listen != null && !listen.isBlank()) {
            mapped.put("spring.grpc.server.address", listen.trim());
        }
        mapped.put("spring.grpc.server.shutdown-grace-period",
                environment.getProperty("meshkit.server.drain-timeout-ms", "5000").trim() + "ms");
        mapped.put("spring.grpc.server.health.enabled", "true");
        String advertise = environment.getProperty("meshkit.server.advertise");
        if (advertise != null && !advertise.isBlank()) {
            mapped.put("meshkit.registry.advertise", advertise.trim());
        }
        environment.getPropertySources().remove(SOURCE);
        environment.getPropertySources().addLast(new MapPropertySource(SOURCE, mapped));
    }

    @Override
    public int getOrder() {
        return Ordered.LOWEST_PRECEDENCE;
    }
}
