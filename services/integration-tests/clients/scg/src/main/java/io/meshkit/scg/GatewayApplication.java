package io.meshkit.scg;

import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.cloud.gateway.route.RouteLocator;
import org.springframework.cloud.gateway.route.builder.RouteLocatorBuilder;
import org.springframework.context.annotation.Bean;

/**
 * Spring Cloud Gateway with one route: every path to {@code --backend}
 * (an {@code https://} address: gRPC is proxied over TLS and HTTP/2 only).
 * TLS and HTTP/2 on the listener come from {@code application.properties}
 * and the command line.
 */
@SpringBootApplication
public class GatewayApplication {

    public static void main(String[] args) {
        SpringApplication.run(GatewayApplication.class, args);
    }

    @Bean
    RouteLocator routes(RouteLocatorBuilder builder, @Value("${backend}") String backend) {
        return builder.routes().route("backend", r -> r.path("/**").uri(backend)).build();
    }
}
