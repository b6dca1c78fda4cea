package io.meshkit.user;

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

/**
 * The connection pool, from {@code MESHKIT_DATABASE_URL} (or {@code DATABASE_URL}),
 * a URL like the Rust services take; {@code MESHKIT_DATABASE_MAX_CONNECTIONS} caps it (8).
 */
@Configuration(proxyBeanMethods = false)
class DatabaseConfig {
    @Bean(destroyMethod = "close")
    HikariDataSource dataSource(
            @Value("${meshkit.database.url:}") String url,
            @Value("${meshkit.database.max-connections:8}") int maxConnections) {
        if (url.isBlank()) {
            throw new StartupCheckException(
                    "MESHKIT_DATABASE_URL is not set: this service needs the PostgreSQL database of the Rust user-service.",
                    "Set MESHKIT_DATABASE_URL to a URL like " + PostgresUrl.EXAMPLE + ".");
        }
        PostgresUrl pg;
        try {
            pg = PostgresUrl.parse(url.trim());
        } catch (IllegalArgumentException e) {
            throw new StartupCheckException(
                    "MESHKIT_DATABASE_URL: " + e.getMessage() + ".",
                    "Set MESHKIT_DATABASE_URL to a URL like " + PostgresUrl.EXAMPLE + ".");
        }
        if (maxConnections < 1) {
            throw new StartupCheckException(
                    "MESHKIT_DATABASE_MAX_CONNECTIONS: must be at least 1.", "Set it to 1 or more (8 by default).");
        }
        HikariConfig config = new HikariConfig();
        config.setPoolName("user-db");
        config.setJdbcUrl(pg.jdbcUrl());
        config.setUsername(pg.user());
        config.setPassword(pg.password());
        config.setMaximumPoolSize(maxConnections);
        config.setMinimumIdle(1);
        // The same bounds as the Rust services' pool: 5 s to connect or to wait for a connection.
        config.setConnectionTimeout(5_000);
        // Connect when the table is checked at start, which says what went wrong.
        config.setInitializationFailTimeout(-1);
        HikariDataSource ds = new HikariDataSource(config);
        UserStore.LOG.info("database {} (pool of at most {})", pg, maxConnections);
        return ds;
    }
}
