package io.meshkit.spring;

import java.util.HashMap;
import java.util.Map;

import io.grpc.ClientInterceptor;
import io.grpc.ServerInterceptor;
import io.opentelemetry.api.OpenTelemetry;
import io.opentelemetry.api.trace.propagation.W3CTraceContextPropagator;
import io.opentelemetry.context.propagation.ContextPropagators;
import io.opentelemetry.instrumentation.grpc.v1_6.GrpcTelemetry;
import io.opentelemetry.sdk.autoconfigure.AutoConfiguredOpenTelemetrySdk;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * OpenTelemetry as the Rust services set it up: spans exported over OTLP/gRPC
 * to {@code OTEL_EXPORTER_OTLP_ENDPOINT}, W3C trace-context propagation, and
 * a SERVER span per call ({@code pkg.Service/Method}, {@code rpc.system},
 * {@code rpc.service}, {@code rpc.method}, {@code rpc.grpc.status_code}) that
 * is the child of the caller's {@code traceparent}.
 */
public final class Tracing {

    private static final Logger log = LoggerFactory.getLogger(Tracing.class);

    private Tracing() {
    }

    /**
     * With an OTLP endpoint set, the SDK as its autoconfigure module reads the
     * {@code OTEL_*} variables ({@code OTEL_SERVICE_NAME}, {@code OTEL_BSP_SCHEDULE_DELAY},
     * {@code OTEL_TRACES_SAMPLER}, …; {@code service.name} defaults to
     * {@code serviceName}); close it at shutdown to flush. Without one (or
     * with {@code OTEL_SDK_DISABLED=true}), no SDK at all: the API's no-op
     * spans still carry an incoming trace context on to outgoing calls, so a
     * trace passing through stays whole, at no cost.
     */
    public static OpenTelemetry fromEnvironment(String serviceName) {
        return fromEnvironment(serviceName, System.getenv());
    }

    static OpenTelemetry fromEnvironment(String serviceName, Map<String, String> env) {
        String endpoint = setting(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        if (endpoint == null) {
            endpoint = setting(env, "OTEL_EXPORTER_OTLP_ENDPOINT");
        }
        if (endpoint == null || "true".equalsIgnoreCase(setting(env, "OTEL_SDK_DISABLED"))) {
            return OpenTelemetry.propagating(ContextPropagators.create(W3CTraceContextPropagator.getInstance()));
        }
        Map<String, String> defaults = Map.of(
                "otel.service.name", serviceName,
                "otel.traces.exporter", "otlp",
                "otel.metrics.exporter", "none",
                "otel.logs.exporter", "none",
                "otel.exporter.otlp.protocol", "grpc",
                "otel.propagators", "tracecontext");
        OpenTelemetry sdk = AutoConfiguredOpenTelemetrySdk.builder()
                .addPropertiesSupplier(() -> defaults)
                .addPropertiesCustomizer(config -> {
                    // People write host:port, as the Rust services accept it: plaintext gRPC.
                    Map<String, String> fixed = new HashMap<>();
                    for (String key : new String[] {"otel.exporter.otlp.endpoint", "otel.exporter.otlp.traces.endpoint"}) {
                        String value = config.getString(key);
                        if (value != null && !value.isBlank() && !value.contains("://")) {
                            fixed.put(key, "http://" + value.trim());
                        }
                    }
                    return fixed;
                })
                .disableShutdownHook()
                .build()
                .getOpenTelemetrySdk();
        log.info("tracing: exporting spans over OTLP to {}", endpoint);
        return sdk;
    }

    private static String setting(Map<String, String> env, String name) {
        String value = System.getProperty(name.toLowerCase().replace('_', '.'));
        if (value == null) {
            value = env.get(name);
        }
        return value == null || value.isBlank() ? null : value;
    }

    /** A SERVER span per call, the child of the caller's traceparent. */
    public static ServerInterceptor serverInterceptor(OpenTelemetry openTelemetry) {
        return GrpcTelemetry.create(openTelemetry).createServerInterceptor();
    }

    /** A CLIENT span per outgoing call, its context sent on as traceparent. */
    public static ClientInterceptor clientInterceptor(OpenTelemetry openTelemetry) {
        return GrpcTelemetry.create(openTelemetry).createClientInterceptor();
    }
}
