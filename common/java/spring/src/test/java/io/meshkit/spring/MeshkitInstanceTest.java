package io.meshkit.spring;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.net.InetSocketAddress;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;
import java.util.function.BooleanSupplier;

import ch.qos.logback.classic.Level;
import com.google.common.util.concurrent.ListenableFuture;
import io.etcd.jetcd.Client;
import io.etcd.jetcd.KeyValue;
import io.etcd.jetcd.Watch;
import io.etcd.jetcd.options.GetOption;
import io.etcd.jetcd.watch.WatchEvent;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse.ServingStatus;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.NettyServerBuilder;
import io.grpc.stub.MetadataUtils;
import io.meshkit.user.v1.GetUserRequest;
import io.meshkit.user.v1.ListUsersRequest;
import io.meshkit.user.v1.User;
import io.meshkit.user.v1.UserServiceGrpc;
import io.opentelemetry.api.common.AttributeKey;
import io.opentelemetry.api.trace.SpanKind;
import io.opentelemetry.api.trace.propagation.W3CTraceContextPropagator;
import io.opentelemetry.context.propagation.ContextPropagators;
import io.opentelemetry.sdk.OpenTelemetrySdk;
import io.opentelemetry.sdk.testing.exporter.InMemorySpanExporter;
import io.opentelemetry.sdk.trace.SdkTracerProvider;
import io.opentelemetry.sdk.trace.data.SpanData;
import io.opentelemetry.sdk.trace.export.SimpleSpanProcessor;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.MethodOrderer;
import org.junit.jupiter.api.Order;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestInstance;
import org.junit.jupiter.api.TestMethodOrder;
import org.slf4j.LoggerFactory;
import tools.jackson.databind.JsonNode;
import tools.jackson.databind.json.JsonMapper;

/** A plain grpc-java server made a meshkit instance, against a real etcd. */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
@TestMethodOrder(MethodOrderer.OrderAnnotation.class)
class MeshkitInstanceTest {

    private static final String SERVICE = "meshkit.user.v1.UserService";

    private EtcdProcess etcd;
    private Client kv;
    private MeshkitInstance mesh;
    private Server server;
    private ManagedChannel channel;
    private final TestUserService service = new TestUserService();
    private final InMemorySpanExporter spans = InMemorySpanExporter.create();
    private final java.util.concurrent.atomic.AtomicInteger reachedListUsers = new java.util.concurrent.atomic.AtomicInteger();
    private final List<ConfigChangedEvent> changes = new CopyOnWriteArrayList<>();
    private Level rootBefore;
    private String key;

    @BeforeAll
    void start() throws Exception {
        etcd = EtcdProcess.start();
        kv = Etcd.connect(List.of(etcd.endpoint));
        put("/meshkit/config/_global/log.filter", "\"warn\"");
        rootBefore = logger("ROOT").getLevel();

        MeshkitProperties properties = new MeshkitProperties();
        properties.setComponent("user-java");
        // host:port without a scheme, as the Rust services take it.
        properties.getEtcd().setEndpoints(List.of(etcd.endpoint.substring("http://".length())));
        properties.getRegistry().setTtlSecs(3);
        properties.getRegistry().setZone("z1");
        properties.getRegistry().setVersion("test-1");
        properties.getServer().setDrainTimeoutMs(3000);
        SdkTracerProvider tracer = SdkTracerProvider.builder().addSpanProcessor(SimpleSpanProcessor.create(spans)).build();
        OpenTelemetrySdk otel = OpenTelemetrySdk.builder()
                .setTracerProvider(tracer)
                .setPropagators(ContextPropagators.create(W3CTraceContextPropagator.getInstance()))
                .build();
        mesh = MeshkitInstance.builder(properties).openTelemetry(otel).onConfigChange(changes::add).start();

        // ListUsers waits 300 ms before the mesh's interceptors see it (a call whose
        // deadline passes meanwhile, as one waiting for a thread); reachedListUsers
        // counts the calls the application's own interceptors see.
        ServerInterceptor slowListUsers = new ServerInterceptor() {
            @Override
            public <Q, A> io.grpc.ServerCall.Listener<Q> interceptCall(io.grpc.ServerCall<Q, A> call, Metadata headers,
                    io.grpc.ServerCallHandler<Q, A> next) {
                if (call.getMethodDescriptor().getBareMethodName().equals("ListUsers")) {
                    sleep(300);
                }
                return next.startCall(call, headers);
            }
        };
        ServerInterceptor countListUsers = new ServerInterceptor() {
            @Override
            public <Q, A> io.grpc.ServerCall.Listener<Q> interceptCall(io.grpc.ServerCall<Q, A> call, Metadata headers,
                    io.grpc.ServerCallHandler<Q, A> next) {
                if (call.getMethodDescriptor().getBareMethodName().equals("ListUsers")) {
                    reachedListUsers.incrementAndGet();
                }
                return next.startCall(call, headers);
            }
        };
        server = mesh.configure(NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0)))
                .intercept(slowListUsers) // added last: runs first
                .addService(ServerInterceptors.intercept(service, countListUsers))
                .build()
                .start();
        mesh.register(server);
        channel = NettyChannelBuilder.forAddress("127.0.0.1", server.getPort()).usePlaintext().build();
        key = "/meshkit/services/" + SERVICE + "/" + mesh.instanceId();
    }

    @AfterAll
    void stop() throws Exception {
        // Each in turn, so that one failing leaves no etcd behind.
        try (EtcdProcess e = etcd; Client k = kv; MeshkitInstance m = mesh) {
            if (channel != null) {
                channel.shutdownNow();
            }
            if (server != null) {
                server.shutdownNow();
            }
        }
    }

    @Test
    @Order(1)
    void registersEveryServiceButHealthAndReflection() throws Exception {
        KeyValue entry = get(key);
        assertTrue(entry != null, "the instance key is written");
        assertNotEquals(0, entry.getLease(), "under a lease");
        JsonNode value = JsonMapper.builder().build().readTree(Etcd.string(entry.getValue()));
        assertEquals("127.0.0.1:" + server.getPort(), value.get("addr").asString());
        assertEquals("z1", value.get("zone").asString());
        assertEquals(100, value.get("weight").asInt());
        assertEquals("test-1", value.get("version").asString());
        assertEquals("user-java", value.at("/metadata/component").asString());
        assertEquals("java", value.at("/metadata/lang").asString());
        InetSocketAddress admin = mesh.adminAddress().orElseThrow();
        assertEquals("127.0.0.1:" + admin.getPort(), value.at("/metadata/admin").asString());
        assertTrue(mesh.instanceId().startsWith("user-java-"), mesh.instanceId());
        long others = Etcd.await(kv.getKVClient().get(Etcd.bytes("/meshkit/services/grpc."),
                GetOption.builder().isPrefix(true).withCountOnly(true).build())).getCount();
        assertEquals(0, others, "health and reflection are not registered");
    }

    @Test
    @Order(2)
    void answersCarryTheInstanceAndHealthIsServing() {
        AtomicReference<Metadata> headers = new AtomicReference<>();
        AtomicReference<Metadata> trailers = new AtomicReference<>();
        UserServiceGrpc.UserServiceBlockingStub stub = UserServiceGrpc.newBlockingStub(channel)
                .withInterceptors(MetadataUtils.newCaptureMetadataInterceptor(headers, trailers));
        User user = stub.getUser(GetUserRequest.newBuilder().setId(TestUserService.ID).build());
        assertEquals("Ada", user.getName());
        assertEquals(mesh.instanceId(), headers.get().get(InstanceHeaderInterceptor.KEY));

        // An error before any message: a trailers-only response names the instance too.
        headers.set(null);
        StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
                () -> stub.getUser(GetUserRequest.newBuilder().setId(TestUserService.MISSING).build()));
        assertEquals(Status.Code.NOT_FOUND, e.getStatus().getCode());
        assertEquals(mesh.instanceId(), trailers.get().get(InstanceHeaderInterceptor.KEY));

        // A request its rules refuse (user.proto: id is a UUID) reaches no handler, and
        // the refusal is named too.
        trailers.set(null);
        long before = service.remainingMillis.get();
        service.remainingMillis.set(-3);
        e = assertThrows(StatusRuntimeException.class,
                () -> stub.getUser(GetUserRequest.newBuilder().setId("42").build()));
        assertEquals(Status.Code.INVALID_ARGUMENT, e.getStatus().getCode());
        assertEquals("id: must be a valid UUID [string.uuid]", e.getStatus().getDescription());
        assertEquals(mesh.instanceId(), trailers.get().get(InstanceHeaderInterceptor.KEY));
        assertEquals(-3, service.remainingMillis.get(), "no handler ran");
        service.remainingMillis.set(before);

        HealthGrpc.HealthBlockingStub health = HealthGrpc.newBlockingStub(channel);
        assertEquals(ServingStatus.SERVING, health.check(HealthCheckRequest.newBuilder().setService(SERVICE).build()).getStatus());
        assertEquals(ServingStatus.SERVING, health.check(HealthCheckRequest.getDefaultInstance()).getStatus());
    }

    @Test
    @Order(3)
    void deadlinesReachHandlersAndAPassedOneRunsNoHandler() throws Exception {
        UserServiceGrpc.UserServiceBlockingStub stub = UserServiceGrpc.newBlockingStub(channel);
        stub.withDeadlineAfter(5, TimeUnit.SECONDS).getUser(GetUserRequest.newBuilder().setId(TestUserService.ID).build());
        long left = service.remainingMillis.get();
        assertTrue(left > 0 && left <= 5000, "Deadlines.remainingMillis() in the handler: " + left);
        stub.getUser(GetUserRequest.newBuilder().setId(TestUserService.ID).build());
        assertEquals(-1, service.remainingMillis.get(), "no deadline, no remaining time");

        StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
                () -> stub.withDeadlineAfter(100, TimeUnit.MILLISECONDS).listUsers(ListUsersRequest.getDefaultInstance()));
        assertEquals(Status.Code.DEADLINE_EXCEEDED, e.getStatus().getCode());
        Thread.sleep(500);
        assertEquals(0, reachedListUsers.get(), "a call past its deadline reached no interceptor after the mesh's");
        assertEquals(0, service.listRuns.get(), "and no handler");
        stub.listUsers(ListUsersRequest.getDefaultInstance());
        assertEquals(1, reachedListUsers.get());
        assertEquals(1, service.listRuns.get());
    }

    @Test
    @Order(4)
    void aServerSpanPerCallIsTheChildOfTheCallersTraceparent() {
        Metadata traceparent = new Metadata();
        traceparent.put(Metadata.Key.of("traceparent", Metadata.ASCII_STRING_MARSHALLER),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        spans.reset();
        UserServiceGrpc.newBlockingStub(channel)
                .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(traceparent))
                .getUser(GetUserRequest.newBuilder().setId(TestUserService.ID).build());
        // The GetUser span: a span of the test before may still end after the reset.
        java.util.function.Supplier<java.util.Optional<SpanData>> getUser = () -> spans.getFinishedSpanItems().stream()
                .filter(s -> s.getName().equals(SERVICE + "/GetUser")).findFirst();
        await(() -> getUser.get().isPresent(), "a GetUser span");
        SpanData span = getUser.get().orElseThrow();
        assertEquals(SpanKind.SERVER, span.getKind());
        assertEquals("0af7651916cd43dd8448eb211c80319c", span.getTraceId());
        assertEquals("b7ad6b7169203331", span.getParentSpanId());
        assertEquals("grpc", span.getAttributes().get(AttributeKey.stringKey("rpc.system")));
        assertEquals(SERVICE, span.getAttributes().get(AttributeKey.stringKey("rpc.service")));
        assertEquals("GetUser", span.getAttributes().get(AttributeKey.stringKey("rpc.method")));
        assertEquals(0L, span.getAttributes().get(AttributeKey.longKey("rpc.grpc.status_code")));
    }

    @Test
    @Order(5)
    void theAdminEndpointServesHealthzAndMetrics() throws Exception {
        String base = "http://127.0.0.1:" + mesh.adminAddress().orElseThrow().getPort();
        HttpClient http = HttpClient.newHttpClient();
        HttpResponse<String> healthz = http.send(HttpRequest.newBuilder(URI.create(base + "/healthz")).build(),
                HttpResponse.BodyHandlers.ofString());
        assertEquals(200, healthz.statusCode());
        assertEquals("ok\n", healthz.body());
        HttpResponse<String> metrics = http.send(HttpRequest.newBuilder(URI.create(base + "/metrics")).build(),
                HttpResponse.BodyHandlers.ofString());
        assertEquals(200, metrics.statusCode());
        String text = metrics.body();
        assertTrue(text.contains("grpc_server_processing_duration_seconds_count{"), "gRPC call metrics");
        assertTrue(text.contains("method=\"GetUser\""), "per method");
        assertTrue(text.contains("jvm_memory_used_bytes"), "JVM metrics");
        assertTrue(text.contains("meshkit_registry_session_up{instance_id=\"" + mesh.instanceId() + "\"} 1"), "session metrics");
        assertEquals(404, http.send(HttpRequest.newBuilder(URI.create(base + "/nope")).build(),
                HttpResponse.BodyHandlers.discarding()).statusCode());
    }

    @Test
    @Order(6)
    void theConfigCenterAppliesLogFilterAndPublishesTheRest() throws Exception {
        ConfigCenter config = mesh.config().orElseThrow();
        assertEquals(Level.WARN, logger("ROOT").getLevel(), "the global log.filter was read at start");

        put("/meshkit/config/user-java/log.filter", "\"info,io.meshkit.test=debug,meshkit_user::db=trace\"");
        await(() -> logger("ROOT").getLevel() == Level.INFO, "the component's log.filter wins");
        assertEquals(Level.DEBUG, logger("io.meshkit.test").getLevel());

        put("/meshkit/config/user-java/log.filter", "\"info,io.meshkit.test=loud\"");
        await(() -> config.lastRejection().isPresent(), "an invalid filter is refused");
        assertTrue(config.lastRejection().get().contains("loud"), config.lastRejection().get());
        assertEquals(Level.INFO, logger("ROOT").getLevel(), "the last good filter stays");
        assertEquals(Level.DEBUG, logger("io.meshkit.test").getLevel());

        put("/meshkit/config/user-java/log.filter", "\"info\"");
        await(() -> logger("io.meshkit.test").getLevel() == null, "a logger no longer named inherits again");

        put("/meshkit/config/user-java/governance.shedding", "{\"enabled\":true,\"max\":10}");
        await(() -> changes.contains(new ConfigChangedEvent("governance.shedding", "{\"enabled\":true,\"max\":10}")),
                "a change event");
        assertTrue(changes.stream().noneMatch(c -> c.path().equals("log.filter")), "log.filter is applied, not published");
        assertEquals(10, config.get("governance.shedding.max").orElseThrow().asInt());

        Etcd.await(kv.getKVClient().delete(Etcd.bytes("/meshkit/config/user-java/log.filter")));
        await(() -> logger("ROOT").getLevel() == Level.WARN, "back to the global filter");
        Etcd.await(kv.getKVClient().delete(Etcd.bytes("/meshkit/config/_global/log.filter")));
        await(() -> logger("ROOT").getLevel() == rootBefore, "back to the process's own level");
    }

    @Test
    @Order(7)
    void anUnansweredKeepaliveKeepsTheLease() throws Exception {
        RegistrySession session = mesh.membership().session().orElseThrow();
        long lease = session.leaseId();
        long before = session.reregistrations();
        etcd.pause(true);
        try {
            // Longer than a keepalive interval and its answer timeout (TTL 3 s: ~1 s and 750 ms), shorter than the TTL.
            await(() -> session.state() == RegistrySession.State.RECONNECTING, "a keepalive went unanswered");
        } finally {
            etcd.pause(false);
        }
        await(() -> session.state() == RegistrySession.State.REGISTERED, "answered again");
        assertEquals(lease, session.leaseId(), "no new lease for an error alone");
        assertEquals(before, session.reregistrations());
        assertEquals(lease, get(key).getLease());
    }

    @Test
    @Order(8)
    void aDeletedKeyIsWrittenAgainUnderTheSameLease() throws Exception {
        long lease = get(key).getLease();
        Etcd.await(kv.getKVClient().delete(Etcd.bytes(key)));
        await(() -> get(key) != null, "the key comes back");
        assertEquals(lease, get(key).getLease());
    }

    @Test
    @Order(9)
    void aRevokedLeaseIsGrantedAgainAndEveryKeyPut() throws Exception {
        RegistrySession session = mesh.membership().session().orElseThrow();
        long lease = get(key).getLease();
        long before = session.reregistrations();
        Etcd.await(kv.getLeaseClient().revoke(lease));
        await(() -> get(key) != null && get(key).getLease() != lease, "the key comes back under a new lease");
        assertEquals(session.leaseId(), get(key).getLease());
        assertTrue(session.reregistrations() > before);
        await(() -> session.state() == RegistrySession.State.REGISTERED, "registered");
    }

    @Test
    @Order(10)
    void shutdownRemovesTheKeyBeforeTheServerStopsAndFinishesCallsInFlight() throws Exception {
        AtomicBoolean deleted = new AtomicBoolean();
        AtomicBoolean serverWasUp = new AtomicBoolean();
        long revision = Etcd.await(kv.getKVClient().get(Etcd.bytes(key))).getHeader().getRevision();
        Watch.Watcher watcher = kv.getWatchClient().watch(Etcd.bytes(key),
                io.etcd.jetcd.options.WatchOption.builder().withRevision(revision + 1).build(), response -> {
                    for (WatchEvent event : response.getEvents()) {
                        if (event.getEventType() == WatchEvent.EventType.DELETE && !deleted.getAndSet(true)) {
                            serverWasUp.set(!server.isShutdown());
                        }
                    }
                });
        try {
            ListenableFuture<User> inFlight = UserServiceGrpc.newFutureStub(channel)
                    .getUser(GetUserRequest.newBuilder().setId(TestUserService.SLOW).build());
            Thread.sleep(100);
            mesh.shutdown(server);
            assertEquals(TestUserService.SLOW, inFlight.get(5, TimeUnit.SECONDS).getId(), "the call in flight finished");
            await(deleted::get, "the key was deleted");
            assertTrue(serverWasUp.get(), "the key went while the server still accepted calls");
            assertNull(get(key));
            assertTrue(server.isTerminated());
        } finally {
            watcher.close();
        }
    }

    @Test
    @Order(11)
    void logFiltersParseAsEnvFilterDoes() {
        assertEquals(new LogFilter("INFO", java.util.Map.of()), LogFilter.parse("info"));
        assertEquals(new LogFilter("WARN", java.util.Map.of("io.meshkit", "DEBUG")), LogFilter.parse("warn,io.meshkit=debug"));
        assertEquals(new LogFilter("INFO", java.util.Map.of("rskafka", "OFF")), LogFilter.parse("info,rskafka=off"));
        assertEquals(new LogFilter(null, java.util.Map.of("io.meshkit", "TRACE")), LogFilter.parse("io.meshkit, meshkit_user::db=off, h2[conn]=off"));
        for (String bad : new String[] {"info,x=loud", "=info", "info,a b=debug", "x[y=info"}) {
            assertThrows(IllegalArgumentException.class, () -> LogFilter.parse(bad), bad);
        }
        assertFalse(LogFilter.parse("").loggers().size() > 0);
    }

    private KeyValue get(String k) {
        try {
            List<KeyValue> kvs = Etcd.await(kv.getKVClient().get(Etcd.bytes(k))).getKvs();
            return kvs.isEmpty() ? null : kvs.get(0);
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
    }

    private void put(String k, String value) throws Exception {
        Etcd.await(kv.getKVClient().put(Etcd.bytes(k), Etcd.bytes(value)));
    }

    private static ch.qos.logback.classic.Logger logger(String name) {
        return (ch.qos.logback.classic.Logger) LoggerFactory.getLogger(name);
    }

    static void await(BooleanSupplier condition, String what) {
        long deadline = System.nanoTime() + Duration.ofSeconds(10).toNanos();
        while (!condition.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                throw new AssertionError("timed out waiting for: " + what);
            }
            sleep(20);
        }
    }

    static void sleep(long millis) {
        try {
            Thread.sleep(millis);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
