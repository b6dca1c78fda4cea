package io.meshkit.spring;

import static io.meshkit.spring.MeshkitInstanceTest.await;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;

import com.google.common.util.concurrent.ListenableFuture;
import io.etcd.jetcd.Client;
import io.etcd.jetcd.KeyValue;
import io.etcd.jetcd.Watch;
import io.etcd.jetcd.options.WatchOption;
import io.etcd.jetcd.watch.WatchEvent;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse.ServingStatus;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.stub.MetadataUtils;
import io.grpc.stub.StreamObserver;
import io.meshkit.user.v1.GetUserRequest;
import io.meshkit.user.v1.User;
import io.meshkit.user.v1.UserServiceGrpc;
import org.junit.jupiter.api.Test;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.EnableAutoConfiguration;
import org.springframework.boot.logging.LogLevel;
import org.springframework.boot.logging.LoggingSystem;
import org.springframework.context.ConfigurableApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.event.EventListener;
import org.springframework.core.env.StandardEnvironment;
import org.springframework.core.env.SystemEnvironmentPropertySource;
import org.springframework.grpc.server.lifecycle.GrpcServerStartedEvent;
import tools.jackson.databind.JsonNode;
import tools.jackson.databind.json.JsonMapper;

/**
 * A spring-grpc application that adds the starter joins the mesh, started
 * with the environment variables a Rust service takes.
 */
class MeshkitAutoConfigurationTest {

    @Configuration(proxyBeanMethods = false)
    @EnableAutoConfiguration
    static class App {
        final List<ConfigChangedEvent> changes = new CopyOnWriteArrayList<>();
        final AtomicReference<Server> server = new AtomicReference<>();

        @Bean
        TestUserService userService() {
            return new TestUserService();
        }

        @EventListener
        void on(ConfigChangedEvent change) {
            changes.add(change);
        }

        @EventListener
        void on(GrpcServerStartedEvent started) {
            server.set(started.getServer());
        }
    }

    @Test
    void joinsTheMeshFromTheEnvironmentAndLeavesBeforeTheServerStops() throws Exception {
        try (EtcdProcess etcd = EtcdProcess.start(); Client kv = Etcd.connect(List.of(etcd.endpoint))) {
            Etcd.await(kv.getKVClient().put(Etcd.bytes("/meshkit/config/user-spring/feature.flag"), Etcd.bytes("true")));

            StandardEnvironment environment = new StandardEnvironment();
            environment.getPropertySources().replace(StandardEnvironment.SYSTEM_ENVIRONMENT_PROPERTY_SOURCE_NAME,
                    new SystemEnvironmentPropertySource(StandardEnvironment.SYSTEM_ENVIRONMENT_PROPERTY_SOURCE_NAME, Map.of(
                            "MESHKIT_ETCD_ENDPOINTS", etcd.endpoint,
                            "MESHKIT_SERVER_LISTEN", "127.0.0.1:0",
                            "MESHKIT_REGISTRY_TTL_SECS", "4",
                            "MESHKIT_REGISTRY_VERSION", "spring-1",
                            "MESHKIT_SERVER_DRAIN_DELAY_MS", "300",
                            "MESHKIT_ADMIN_LISTEN", "127.0.0.1:0")));
            SpringApplication application = new SpringApplication(App.class);
            application.setEnvironment(environment);
            application.setDefaultProperties(Map.<String, Object>of("spring.application.name", "user-spring"));
            ConfigurableApplicationContext context = application.run();
            ManagedChannel channel = null;
            try {
                assertEquals("127.0.0.1:0", environment.getProperty("spring.grpc.server.address"));
                assertEquals("5000ms", environment.getProperty("spring.grpc.server.shutdown-grace-period"));
                App app = context.getBean(App.class);
                MeshkitIdentity identity = context.getBean(MeshkitIdentity.class);
                assertEquals("user-spring", identity.component());
                int port = app.server.get().getPort();
                assertNotEquals(0, port);

                String key = "/meshkit/services/meshkit.user.v1.UserService/" + identity.instanceId();
                KeyValue entry = Etcd.await(kv.getKVClient().get(Etcd.bytes(key))).getKvs().get(0);
                JsonNode value = JsonMapper.builder().build().readTree(Etcd.string(entry.getValue()));
                assertEquals("127.0.0.1:" + port, value.get("addr").asString(), "the port bound, not the one configured");
                assertEquals("spring-1", value.get("version").asString());
                assertEquals("user-spring", value.at("/metadata/component").asString());
                int adminPort = context.getBean(AdminServer.class).address().getPort();
                assertEquals("127.0.0.1:" + adminPort, value.at("/metadata/admin").asString());
                assertEquals(4, Etcd.await(kv.getLeaseClient().timeToLive(entry.getLease(),
                        io.etcd.jetcd.options.LeaseOption.DEFAULT)).getGrantedTTL(), "MESHKIT_REGISTRY_TTL_SECS");

                channel = NettyChannelBuilder.forAddress("127.0.0.1", port).usePlaintext().build();
                AtomicReference<Metadata> headers = new AtomicReference<>();
                User user = UserServiceGrpc.newBlockingStub(channel)
                        .withInterceptors(MetadataUtils.newCaptureMetadataInterceptor(headers, new AtomicReference<>()))
                        .getUser(GetUserRequest.newBuilder().setId(TestUserService.ID).build());
                assertEquals(TestUserService.ID, user.getId());
                assertEquals(identity.instanceId(), headers.get().get(InstanceHeaderInterceptor.KEY));
                assertEquals(ServingStatus.SERVING, HealthGrpc.newBlockingStub(channel)
                        .check(HealthCheckRequest.newBuilder().setService("meshkit.user.v1.UserService").build()).getStatus());
                assertTrue(reflectionV1alpha(channel).contains("meshkit.user.v1.UserService"), "reflection v1alpha");
                assertTrue(reflectionV1(channel).contains("meshkit.user.v1.UserService"), "reflection v1");

                // The config center: read at start, then watched.
                ConfigCenter config = context.getBean(ConfigCenter.class);
                assertEquals("true", config.get("feature.flag").orElseThrow().toString());
                Etcd.await(kv.getKVClient().put(Etcd.bytes("/meshkit/config/_global/log.filter"),
                        Etcd.bytes("\"info,io.meshkit.spring.it=debug\"")));
                Etcd.await(kv.getKVClient().put(Etcd.bytes("/meshkit/config/user-spring/feature.flag"), Etcd.bytes("false")));
                LoggingSystem logging = context.getBean(LoggingSystem.class);
                await(() -> logging.getLoggerConfiguration("io.meshkit.spring.it") != null
                        && logging.getLoggerConfiguration("io.meshkit.spring.it").getConfiguredLevel() == LogLevel.DEBUG,
                        "log.filter through the LoggingSystem");
                await(() -> app.changes.contains(new ConfigChangedEvent("feature.flag", "false")), "a ConfigChangedEvent");

                // Shutdown: the key goes while the server still accepts calls, and a call in flight finishes.
                Server server = app.server.get();
                AtomicBoolean serverWasUp = new AtomicBoolean();
                CountDownLatch deleted = new CountDownLatch(1);
                Watch.Watcher watcher = kv.getWatchClient().watch(Etcd.bytes(key), WatchOption.builder().withNoPut(true).build(),
                        response -> {
                            for (WatchEvent event : response.getEvents()) {
                                if (event.getEventType() == WatchEvent.EventType.DELETE && deleted.getCount() > 0) {
                                    serverWasUp.set(!server.isShutdown());
                                    deleted.countDown();
                                }
                            }
                        });
                Thread.sleep(200);
                ListenableFuture<User> inFlight = UserServiceGrpc.newFutureStub(channel)
                        .getUser(GetUserRequest.newBuilder().setId(TestUserService.SLOW).build());
                Thread.sleep(100);
                context.close();
                assertEquals(TestUserService.SLOW, inFlight.get(5, TimeUnit.SECONDS).getId(), "the call in flight finished");
                assertTrue(deleted.await(5, TimeUnit.SECONDS), "the key was deleted");
                assertTrue(serverWasUp.get(), "before the server stopped accepting");
                assertTrue(server.isTerminated());
                watcher.close();
            } finally {
                context.close();
                if (channel != null) {
                    channel.shutdownNow();
                }
            }
        }
    }

    @Test
    void withRegistrationAndTheConfigCenterOffItServesWithoutEtcd() {
        StandardEnvironment environment = new StandardEnvironment();
        environment.getPropertySources().replace(StandardEnvironment.SYSTEM_ENVIRONMENT_PROPERTY_SOURCE_NAME,
                new SystemEnvironmentPropertySource(StandardEnvironment.SYSTEM_ENVIRONMENT_PROPERTY_SOURCE_NAME, Map.of(
                        "MESHKIT_ETCD_ENDPOINTS", "127.0.0.1:1",
                        "MESHKIT_REGISTRY_ENABLED", "false",
                        "MESHKIT_CONFIG_ENABLED", "false",
                        "MESHKIT_SERVER_LISTEN", "127.0.0.1:0")));
        SpringApplication application = new SpringApplication(App.class);
        application.setEnvironment(environment);
        ManagedChannel channel = null;
        try (ConfigurableApplicationContext context = application.run()) {
            assertTrue(context.getBeansOfType(ConfigCenter.class).isEmpty());
            assertTrue(context.getBean(Membership.class).session().isEmpty(), "not registered");
            int port = context.getBean(App.class).server.get().getPort();
            channel = NettyChannelBuilder.forAddress("127.0.0.1", port).usePlaintext().build();
            assertEquals(ServingStatus.SERVING, HealthGrpc.newBlockingStub(channel)
                    .check(HealthCheckRequest.newBuilder().setService("meshkit.user.v1.UserService").build()).getStatus());
            // The starter's ValidationInterceptor checks user.proto's rules before the handler.
            ManagedChannel ch = channel;
            StatusRuntimeException refused = assertThrows(StatusRuntimeException.class,
                    () -> UserServiceGrpc.newBlockingStub(ch).getUser(GetUserRequest.newBuilder().setId("7").build()));
            assertEquals(Status.Code.INVALID_ARGUMENT, refused.getStatus().getCode());
            assertEquals("id: must be a valid UUID [string.uuid]", refused.getStatus().getDescription());
            assertEquals(TestUserService.ID,
                    UserServiceGrpc.newBlockingStub(ch).getUser(GetUserRequest.newBuilder().setId(TestUserService.ID).build()).getId());
            assertTrue(context.getBean(MeshkitIdentity.class).instanceId().startsWith("java-"),
                    "no application name: the component is \"java\"");
        } finally {
            if (channel != null) {
                channel.shutdownNow();
            }
        }
    }

    private static List<String> reflectionV1alpha(ManagedChannel channel) throws InterruptedException {
        return listServices(
                io.grpc.reflection.v1alpha.ServerReflectionGrpc.newStub(channel)::serverReflectionInfo,
                io.grpc.reflection.v1alpha.ServerReflectionRequest.newBuilder().setListServices("").build(),
                response -> response.getListServicesResponse().getServiceList().stream().map(s -> s.getName()).toList());
    }

    private static List<String> reflectionV1(ManagedChannel channel) throws InterruptedException {
        return listServices(
                io.grpc.reflection.v1.ServerReflectionGrpc.newStub(channel)::serverReflectionInfo,
                io.grpc.reflection.v1.ServerReflectionRequest.newBuilder().setListServices("").build(),
                response -> response.getListServicesResponse().getServiceList().stream().map(s -> s.getName()).toList());
    }

    /** One ListServices exchange on a reflection stream (v1 and v1alpha differ only in types). */
    private static <Q, R> List<String> listServices(
            java.util.function.Function<StreamObserver<R>, StreamObserver<Q>> open,
            Q request,
            java.util.function.Function<R, List<String>> names) throws InterruptedException {
        List<String> found = new ArrayList<>();
        CountDownLatch done = new CountDownLatch(1);
        StreamObserver<Q> requests = open.apply(new StreamObserver<>() {
            @Override
            public void onNext(R response) {
                found.addAll(names.apply(response));
            }

            @Override
            public void onError(Throwable t) {
                done.countDown();
            }

            @Override
            public void onCompleted() {
                done.countDown();
            }
        });
        requests.onNext(request);
        requests.onCompleted();
        done.await(5, TimeUnit.SECONDS);
        return found;
    }
}
