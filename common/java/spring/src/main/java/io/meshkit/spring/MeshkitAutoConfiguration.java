package io.meshkit.spring;

import java.util.Optional;

import io.etcd.jetcd.Client;
import io.grpc.BindableService;
import io.grpc.ClientInterceptor;
import io.grpc.ServerInterceptor;
import io.grpc.protobuf.services.HealthStatusManager;
import io.micrometer.core.instrument.binder.grpc.MetricCollectingServerInterceptor;
import io.micrometer.prometheusmetrics.PrometheusConfig;
import io.micrometer.prometheusmetrics.PrometheusMeterRegistry;
import io.opentelemetry.api.OpenTelemetry;
import org.springframework.beans.factory.ObjectProvider;
import org.springframework.boot.autoconfigure.AutoConfiguration;
import org.springframework.boot.autoconfigure.condition.ConditionalOnBooleanProperty;
import org.springframework.boot.autoconfigure.condition.ConditionalOnClass;
import org.springframework.boot.autoconfigure.condition.ConditionalOnMissingBean;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.boot.logging.LogLevel;
import org.springframework.boot.logging.LoggerConfiguration;
import org.springframework.boot.logging.LoggingSystem;
import org.springframework.context.ApplicationEventPublisher;
import org.springframework.context.ApplicationListener;
import org.springframework.context.annotation.Bean;
import org.springframework.core.Ordered;
import org.springframework.core.annotation.Order;
import org.springframework.core.env.Environment;
import org.springframework.grpc.client.GlobalClientInterceptor;
import org.springframework.grpc.server.GlobalServerInterceptor;
import org.springframework.grpc.server.lifecycle.GrpcServerLifecycle;
import org.springframework.grpc.server.lifecycle.GrpcServerLifecycleEvent;
import org.springframework.grpc.server.lifecycle.GrpcServerShutdownEvent;
import org.springframework.grpc.server.lifecycle.GrpcServerStartedEvent;
import org.springframework.util.ClassUtils;

/**
 * Makes a spring-grpc application a meshkit instance: add the dependency and
 * set {@code meshkit.etcd.endpoints} (and {@code meshkit.registry.version}, …).
 *
 * <p>spring-grpc brings the health service (its HealthStatusManager, driven
 * here) and reflection v1 ({@code spring.grpc.server.health.*},
 * {@code spring.grpc.server.reflection.*}); this adds reflection v1alpha, the
 * interceptors (the last of them checks each request's protovalidate rules), the admin endpoint, the config center, tracing, and the
 * registration. The registration follows the server's own lifecycle events:
 * spring-grpc's GrpcServerLifecycle has phase Integer.MAX_VALUE, so no other
 * SmartLifecycle can stop before it, but it publishes GrpcServerStartedEvent
 * (with the bound port) right after binding, and GrpcServerShutdownEvent
 * synchronously before {@code server.shutdown()}. So the stop order is:
 * NOT_SERVING, revoke, drain delay (in the shutdown event), then the server
 * stops accepting and waits its shutdown-grace-period (set from
 * {@code meshkit.server.drain-timeout-ms}) for in-flight calls.
 */
@AutoConfiguration(afterName = {
        "org.springframework.boot.grpc.server.autoconfigure.health.GrpcServerHealthAutoConfiguration",
        "org.springframework.boot.micrometer.metrics.autoconfigure.CompositeMeterRegistryAutoConfiguration",
        "org.springframework.boot.micrometer.metrics.autoconfigure.export.prometheus.PrometheusMetricsExportAutoConfiguration" })
@ConditionalOnClass({ Client.class, GrpcServerLifecycle.class })
@EnableConfigurationProperties(MeshkitProperties.class)
public class MeshkitAutoConfiguration {

    /** Present when Spring Boot's own metrics (Actuator) bind the JVM's meters. */
    private static final String BOOT_METRICS = "org.springframework.boot.micrometer.metrics.autoconfigure.MetricsAutoConfiguration";

    @Bean
    @ConditionalOnMissingBean
    MeshkitIdentity meshkitIdentity(MeshkitProperties properties, Environment environment) {
        properties.validate();
        String component = MeshkitInstance.component(properties,
                environment.getProperty("spring.application.name", "java"));
        return new MeshkitIdentity(component, MeshkitInstance.instanceId(properties, component));
    }

    @Bean
    @ConditionalOnMissingBean
    PrometheusMeterRegistry meshkitPrometheusMeterRegistry() {
        PrometheusMeterRegistry registry = new PrometheusMeterRegistry(PrometheusConfig.DEFAULT);
        if (!ClassUtils.isPresent(BOOT_METRICS, getClass().getClassLoader())) {
            MeshkitInstance.bindJvmMetrics(registry);
        }
        return registry;
    }

    /**
     * Closed (spans flushed) with the context: the SDK's close() is inferred. The spans'
     * {@code service.name} is the application's name, as Spring Boot names it, so a Spring
     * instance and a Rust one of the same component are told apart in a trace.
     */
    @Bean
    @ConditionalOnMissingBean
    OpenTelemetry meshkitOpenTelemetry(MeshkitIdentity identity, Environment env) {
        return Tracing.fromEnvironment(env.getProperty("spring.application.name", identity.component()));
    }

    // spring-grpc applies global interceptors in @Order order, the first outermost.

    @Bean
    @GlobalServerInterceptor
    @Order(Ordered.HIGHEST_PRECEDENCE)
    InstanceHeaderInterceptor meshkitInstanceHeaderInterceptor(MeshkitIdentity identity) {
        return new InstanceHeaderInterceptor(identity.instanceId());
    }

    @Bean
    @GlobalServerInterceptor
    @Order(Ordered.HIGHEST_PRECEDENCE + 10)
    ServerInterceptor meshkitTracingServerInterceptor(OpenTelemetry openTelemetry) {
        return Tracing.serverInterceptor(openTelemetry);
    }

    @Bean
    @GlobalServerInterceptor
    @Order(Ordered.HIGHEST_PRECEDENCE + 20)
    MetricCollectingServerInterceptor meshkitMetricsServerInterceptor(PrometheusMeterRegistry registry) {
        return new MetricCollectingServerInterceptor(registry);
    }

    @Bean
    @GlobalServerInterceptor
    @Order(Ordered.HIGHEST_PRECEDENCE + 30)
    DeadlineInterceptor meshkitDeadlineInterceptor() {
        return new DeadlineInterceptor();
    }

    /**
     * Innermost: every request is checked against its protovalidate rules before the
     * handler runs (INVALID_ARGUMENT with a BadRequest detail, as the Rust servers).
     * An application's own ValidationInterceptor bean (another Validator) replaces it.
     */
    @Bean
    @GlobalServerInterceptor
    @Order(Ordered.HIGHEST_PRECEDENCE + 40)
    @ConditionalOnMissingBean
    ValidationInterceptor meshkitValidationInterceptor() {
        return new ValidationInterceptor();
    }

    /** Outgoing calls on spring-grpc's channels carry the trace on. */
    @Bean
    @GlobalClientInterceptor
    ClientInterceptor meshkitTracingClientInterceptor(OpenTelemetry openTelemetry) {
        return Tracing.clientInterceptor(openTelemetry);
    }

    /** spring-grpc serves reflection v1; grpcurl 1.8 speaks only v1alpha. */
    @Bean
    @ConditionalOnBooleanProperty(name = "spring.grpc.server.reflection.enabled", matchIfMissing = true)
    @SuppressWarnings("deprecation")
    BindableService meshkitReflectionV1alpha() {
        return io.grpc.protobuf.services.ProtoReflectionService.newInstance();
    }

    /**
     * Reflection's descriptors with each field's JSON name, as the Rust services send
     * them, so grpcurl prints the same JSON from a Spring and a Rust instance.
     */
    @Bean
    @GlobalServerInterceptor
    @ConditionalOnBooleanProperty(name = "spring.grpc.server.reflection.enabled", matchIfMissing = true)
    ServerInterceptor meshkitReflectionJsonNames() {
        return new ReflectionJsonNames();
    }

    /** jetcd connects on the first call. */
    @Bean(destroyMethod = "close")
    @ConditionalOnMissingBean
    Client meshkitEtcdClient(MeshkitProperties properties) {
        return Etcd.connect(properties.getEtcd().getEndpoints());
    }

    @Bean(destroyMethod = "close")
    @ConditionalOnBooleanProperty(name = "meshkit.admin.enabled", matchIfMissing = true)
    AdminServer meshkitAdminServer(MeshkitProperties properties, PrometheusMeterRegistry registry) throws Exception {
        return AdminServer.start(properties.getAdmin().getListen(), registry);
    }

    /** Read before the server starts, so a log.filter from etcd is in force from the first call. */
    @Bean(destroyMethod = "close")
    @ConditionalOnBooleanProperty(name = "meshkit.config.enabled", matchIfMissing = true)
    ConfigCenter meshkitConfigCenter(Client etcd, MeshkitProperties properties, MeshkitIdentity identity,
            ApplicationEventPublisher events, ObjectProvider<LoggingSystem> loggingSystem) throws Exception {
        LoggingSystem system = loggingSystem.getIfAvailable();
        LogFilter.Levels levels = system == null ? LogFilter.logback() : springLevels(system);
        try {
            return ConfigCenter.start(etcd, properties.getEtcd().getPrefix(), identity.component(),
                    new LogFilter.Applier(levels), events::publishEvent);
        } catch (IllegalStateException e) {
            throw new IllegalStateException(e.getMessage() + " (meshkit.etcd.endpoints "
                    + properties.getEtcd().getEndpoints() + "; meshkit.config.enabled=false turns it off)", e.getCause());
        }
    }

    @Bean
    Membership meshkitMembership(MeshkitProperties properties, MeshkitIdentity identity, Client etcd,
            ObjectProvider<HealthStatusManager> health, PrometheusMeterRegistry registry,
            ObjectProvider<AdminServer> admin) {
        AdminServer adminServer = admin.getIfAvailable();
        return new Membership(properties, identity.component(), identity.instanceId(),
                properties.getRegistry().isEnabled() ? etcd : null, health.getIfAvailable(), registry,
                adminServer == null ? null : adminServer.address());
    }

    @Bean
    MeshkitServerEvents meshkitServerEvents(Membership membership, ObjectProvider<ValidationInterceptor> validation) {
        return new MeshkitServerEvents(membership, validation.getIfAvailable());
    }

    /**
     * Joins when the gRPC server has bound its port, once the validation rules of what it
     * serves are compiled; leaves before it stops accepting.
     */
    static final class MeshkitServerEvents implements ApplicationListener<GrpcServerLifecycleEvent> {
        private final Membership membership;
        private final ValidationInterceptor validation;

        MeshkitServerEvents(Membership membership, ValidationInterceptor validation) {
            this.membership = membership;
            this.validation = validation;
        }

        @Override
        public void onApplicationEvent(GrpcServerLifecycleEvent event) {
            if (event instanceof GrpcServerStartedEvent started) {
                if (validation != null) {
                    validation.warmUp(started.getServer().getServices());
                }
                try {
                    membership.join(started.getServer());
                } catch (Exception e) {
                    throw new IllegalStateException("joining the mesh failed: " + e.getMessage(), e);
                }
            } else if (event instanceof GrpcServerShutdownEvent) {
                membership.leave();
            }
        }
    }

    /** log.filter through Spring Boot's LoggingSystem (Logback by default). */
    static LogFilter.Levels springLevels(LoggingSystem system) {
        return new LogFilter.Levels() {
            @Override
            public Optional<String> get(String logger) {
                return Optional.ofNullable(system.getLoggerConfiguration(logger))
                        .map(LoggerConfiguration::getConfiguredLevel)
                        .map(LogLevel::name);
            }

            @Override
            public void set(String logger, Optional<String> level) {
                system.setLogLevel(logger, level.map(LogLevel::valueOf).orElse(null));
            }
        };
    }
}
