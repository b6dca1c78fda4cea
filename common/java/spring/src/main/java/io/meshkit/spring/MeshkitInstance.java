package io.meshkit.spring;

import java.net.InetSocketAddress;
import java.util.HexFormat;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.function.Consumer;

import io.etcd.jetcd.Client;
import io.grpc.Server;
import io.grpc.ServerBuilder;
import io.grpc.ServerInterceptor;
import io.grpc.protobuf.services.HealthStatusManager;
import io.grpc.protobuf.services.ProtoReflectionServiceV1;
import io.micrometer.core.instrument.MeterRegistry;
import io.micrometer.core.instrument.binder.grpc.MetricCollectingServerInterceptor;
import io.micrometer.core.instrument.binder.jvm.ClassLoaderMetrics;
import io.micrometer.core.instrument.binder.jvm.JvmGcMetrics;
import io.micrometer.core.instrument.binder.jvm.JvmMemoryMetrics;
import io.micrometer.core.instrument.binder.jvm.JvmThreadMetrics;
import io.micrometer.core.instrument.binder.system.ProcessorMetrics;
import io.micrometer.core.instrument.binder.system.UptimeMetrics;
import io.micrometer.prometheusmetrics.PrometheusConfig;
import io.micrometer.prometheusmetrics.PrometheusMeterRegistry;
import io.opentelemetry.api.OpenTelemetry;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Makes a plain grpc-java server a meshkit instance, without Spring:
 *
 * <pre>{@code
 * MeshkitInstance mesh = MeshkitInstance.builder(properties).start();
 * Server server = mesh.configure(NettyServerBuilder.forAddress(listen))
 *         .addService(new MyService())
 *         .build()
 *         .start();
 * mesh.register(server);       // every service but health and reflection, SERVING
 * ...
 * mesh.shutdown(server);       // NOT_SERVING, revoke, drain delay, stop, in-flight calls, close
 * }</pre>
 */
public final class MeshkitInstance implements AutoCloseable {

    private static final Logger log = LoggerFactory.getLogger(MeshkitInstance.class);

    private final MeshkitProperties properties;
    private final String component;
    private final String instanceId;
    private final PrometheusMeterRegistry metrics;
    private final OpenTelemetry openTelemetry;
    private final boolean ownsOpenTelemetry;
    private final Client etcd;
    private final AdminServer admin;
    private final ConfigCenter config;
    private final HealthStatusManager health = new HealthStatusManager();
    /** One for the instance: protovalidate caches each message type's rules in it. */
    private final ValidationInterceptor validation = new ValidationInterceptor();
    private final Membership membership;

    private MeshkitInstance(Builder b) throws Exception {
        properties = b.properties;
        component = component(properties, "java");
        instanceId = instanceId(properties, component);
        metrics = b.metrics != null ? b.metrics : prometheusRegistry();
        ownsOpenTelemetry = b.openTelemetry == null;
        openTelemetry = ownsOpenTelemetry ? Tracing.fromEnvironment(component) : b.openTelemetry;
        boolean needsEtcd = properties.getRegistry().isEnabled() || properties.getConfig().isEnabled();
        etcd = needsEtcd ? Etcd.connect(properties.getEtcd().getEndpoints()) : null;
        try {
            admin = properties.getAdmin().isEnabled() ? AdminServer.start(properties.getAdmin().getListen(), metrics) : null;
            config = properties.getConfig().isEnabled()
                    ? ConfigCenter.start(etcd, properties.getEtcd().getPrefix(), component,
                            new LogFilter.Applier(LogFilter.logback()), b.onConfigChange)
                    : null;
        } catch (Exception e) {
            close();
            throw e;
        }
        membership = new Membership(properties, component, instanceId,
                properties.getRegistry().isEnabled() ? etcd : null, health, metrics,
                admin == null ? null : admin.address());
    }

    public static Builder builder(MeshkitProperties properties) {
        return new Builder(properties);
    }

    public static final class Builder {
        private final MeshkitProperties properties;
        private PrometheusMeterRegistry metrics;
        private OpenTelemetry openTelemetry;
        private Consumer<ConfigChangedEvent> onConfigChange = change -> { };

        private Builder(MeshkitProperties properties) {
            this.properties = properties;
        }

        /** The registry /metrics serves; default: a new one with JVM metrics. */
        public Builder metrics(PrometheusMeterRegistry metrics) {
            this.metrics = metrics;
            return this;
        }

        /** Default: {@link Tracing#fromEnvironment}. */
        public Builder openTelemetry(OpenTelemetry openTelemetry) {
            this.openTelemetry = openTelemetry;
            return this;
        }

        /** Called on the config center's thread for every changed setting but log.filter. */
        public Builder onConfigChange(Consumer<ConfigChangedEvent> listener) {
            this.onConfigChange = listener;
            return this;
        }

        /** Connects etcd, starts the admin endpoint and reads the config center. */
        public MeshkitInstance start() throws Exception {
            properties.validate();
            return new MeshkitInstance(this);
        }
    }

    /**
     * Adds health, reflection (v1, and v1alpha for grpcurl 1.8) and the
     * interceptors, outermost first: the instance header, the server span,
     * the call metrics, the deadline check, the request's protovalidate rules.
     */
    @SuppressWarnings("deprecation") // v1alpha reflection: grpcurl 1.8 speaks nothing else.
    public <T extends ServerBuilder<T>> T configure(T builder) {
        builder.addService(health.getHealthService())
                .addService(ProtoReflectionServiceV1.newInstance())
                .addService(io.grpc.protobuf.services.ProtoReflectionService.newInstance());
        // ServerBuilder runs the interceptor added last first.
        List<ServerInterceptor> outermostFirst = interceptors();
        for (int i = outermostFirst.size() - 1; i >= 0; i--) {
            builder.intercept(outermostFirst.get(i));
        }
        return builder;
    }

    /** The server interceptors, outermost first. */
    public List<ServerInterceptor> interceptors() {
        return List.of(
                new InstanceHeaderInterceptor(instanceId),
                Tracing.serverInterceptor(openTelemetry),
                new MetricCollectingServerInterceptor(metrics),
                new DeadlineInterceptor(),
                validation);
    }

    /**
     * Compiles the validation rules of every served method's input (a rule that does not
     * compile throws here), then registers the started server in etcd and reports its
     * services SERVING.
     */
    public void register(Server server) throws Exception {
        validation.warmUp(server.getServices());
        membership.join(server);
    }

    /**
     * Drains and stops: NOT_SERVING, revoke the lease, the drain delay, stop
     * accepting, wait up to the drain timeout for in-flight calls; then closes
     * this instance.
     */
    public void shutdown(Server server) throws InterruptedException {
        membership.leave();
        server.shutdown();
        long timeout = properties.getServer().getDrainTimeoutMs();
        if (!server.awaitTermination(timeout, TimeUnit.MILLISECONDS)) {
            log.warn("in-flight calls outlived the drain timeout ({} ms): cancelling them", timeout);
            server.shutdownNow();
        }
        close();
    }

    @Override
    public void close() {
        if (membership != null) {
            membership.session().ifPresent(RegistrySession::close);
        }
        if (config != null) {
            config.close();
        }
        if (admin != null) {
            admin.close();
        }
        if (etcd != null) {
            etcd.close();
        }
        if (ownsOpenTelemetry && openTelemetry instanceof AutoCloseable closeable) {
            try {
                closeable.close();
            } catch (Exception e) {
                log.debug("closing OpenTelemetry: {}", e.toString());
            }
        }
    }

    public String instanceId() {
        return instanceId;
    }

    public String component() {
        return component;
    }

    public HealthStatusManager health() {
        return health;
    }

    public PrometheusMeterRegistry metrics() {
        return metrics;
    }

    public OpenTelemetry openTelemetry() {
        return openTelemetry;
    }

    /** The config center, unless {@code meshkit.config.enabled} is false. */
    public Optional<ConfigCenter> config() {
        return Optional.ofNullable(config);
    }

    /** The admin endpoint's bound address, unless it is off. */
    public Optional<InetSocketAddress> adminAddress() {
        return Optional.ofNullable(admin).map(AdminServer::address);
    }

    public Membership membership() {
        return membership;
    }

    /** {@code meshkit.component}, else {@code fallback}. */
    static String component(MeshkitProperties properties, String fallback) {
        String c = properties.getComponent();
        return c == null || c.isBlank() ? fallback : c.trim();
    }

    /** {@code meshkit.registry.instance-id}, else the component and a random suffix. */
    static String instanceId(MeshkitProperties properties, String component) {
        String id = properties.getRegistry().getInstanceId();
        if (id != null && !id.isBlank()) {
            return id.trim();
        }
        byte[] random = new byte[5];
        ThreadLocalRandom.current().nextBytes(random);
        return component + "-" + HexFormat.of().formatHex(random);
    }

    /** A Prometheus registry with the JVM's metrics (memory, GC, threads, classes, CPU, uptime). */
    static PrometheusMeterRegistry prometheusRegistry() {
        PrometheusMeterRegistry registry = new PrometheusMeterRegistry(PrometheusConfig.DEFAULT);
        bindJvmMetrics(registry);
        return registry;
    }

    @SuppressWarnings("resource") // JvmGcMetrics lives as long as the process.
    static void bindJvmMetrics(MeterRegistry registry) {
        new JvmMemoryMetrics().bindTo(registry);
        new JvmGcMetrics().bindTo(registry);
        new JvmThreadMetrics().bindTo(registry);
        new ClassLoaderMetrics().bindTo(registry);
        new ProcessorMetrics().bindTo(registry);
        new UptimeMetrics().bindTo(registry);
    }
}
