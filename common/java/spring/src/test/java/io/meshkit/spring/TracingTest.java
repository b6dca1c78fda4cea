package io.meshkit.spring;

import static io.meshkit.spring.MeshkitInstanceTest.await;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Map;

import io.grpc.MethodDescriptor;
import io.grpc.Server;
import io.grpc.ServerServiceDefinition;
import io.grpc.netty.NettyServerBuilder;
import io.grpc.stub.ServerCalls;
import io.opentelemetry.api.OpenTelemetry;
import io.opentelemetry.sdk.OpenTelemetrySdk;
import org.junit.jupiter.api.Test;

/** Spans leave over OTLP/gRPC when an endpoint is set, and nothing is set up when none is. */
class TracingTest {

    /** Bytes as they come: an OTLP export request, whose strings are readable in it. */
    private static final MethodDescriptor.Marshaller<byte[]> BYTES = new MethodDescriptor.Marshaller<>() {
        @Override
        public InputStream stream(byte[] value) {
            return new ByteArrayInputStream(value);
        }

        @Override
        public byte[] parse(InputStream stream) {
            try {
                return stream.readAllBytes();
            } catch (IOException e) {
                throw new IllegalStateException(e);
            }
        }
    };

    @Test
    void spansAreExportedToABareHostPortWithTheComponentAsServiceName() throws Exception {
        StringBuffer received = new StringBuffer();
        MethodDescriptor<byte[], byte[]> export = MethodDescriptor.<byte[], byte[]>newBuilder()
                .setType(MethodDescriptor.MethodType.UNARY)
                .setFullMethodName("opentelemetry.proto.collector.trace.v1.TraceService/Export")
                .setRequestMarshaller(BYTES)
                .setResponseMarshaller(BYTES)
                .build();
        ServerServiceDefinition collector = ServerServiceDefinition.builder("opentelemetry.proto.collector.trace.v1.TraceService")
                .addMethod(export, ServerCalls.asyncUnaryCall((request, response) -> {
                    received.append(new String(request, StandardCharsets.ISO_8859_1));
                    response.onNext(new byte[0]); // an empty ExportTraceServiceResponse
                    response.onCompleted();
                }))
                .build();
        Server server = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0)).addService(collector).build().start();
        // The SDK's autoconfigure reads system properties as it reads OTEL_* variables.
        System.setProperty("otel.exporter.otlp.endpoint", "127.0.0.1:" + server.getPort());
        System.setProperty("otel.bsp.schedule.delay", "50");
        try {
            OpenTelemetry otel = Tracing.fromEnvironment("user-java", Map.of());
            assertTrue(otel instanceof OpenTelemetrySdk, "an SDK when an endpoint is set");
            otel.getTracer("test").spanBuilder("probe-span").startSpan().end();
            await(() -> received.indexOf("probe-span") >= 0, "the span at the collector");
            assertTrue(received.indexOf("user-java") >= 0, "service.name defaults to the component");
            ((OpenTelemetrySdk) otel).close();
        } finally {
            System.clearProperty("otel.exporter.otlp.endpoint");
            System.clearProperty("otel.bsp.schedule.delay");
            server.shutdownNow();
        }
    }

    @Test
    void withoutAnEndpointThereIsNoSdk() {
        OpenTelemetry otel = Tracing.fromEnvironment("user-java", Map.of());
        assertFalse(otel instanceof OpenTelemetrySdk);
        assertFalse(otel.getTracer("test").spanBuilder("x").startSpan().isRecording());
    }
}
