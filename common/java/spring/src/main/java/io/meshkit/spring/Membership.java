package io.meshkit.spring;

import java.net.InetSocketAddress;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import java.util.TreeMap;

import io.etcd.jetcd.Client;
import io.grpc.Server;
import io.grpc.ServerServiceDefinition;
import io.grpc.health.v1.HealthCheckResponse.ServingStatus;
import io.grpc.protobuf.services.HealthStatusManager;
import io.micrometer.core.instrument.MeterRegistry;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * A started gRPC server's place in the mesh: its health and its registration.
 * {@link #join} registers every service the server serves (health and
 * reflection aside) and reports them SERVING; {@link #leave} drains in the
 * order watchers need, as common/mesh's RunningServer::shutdown does:
 * NOT_SERVING, revoke the lease, wait the drain delay for watchers to drop
 * the instance. Stopping the server (stop accepting, finish in-flight calls)
 * comes after it, by whoever owns the server.
 */
public final class Membership {

    /** Services every server has; not pools of their own. */
    static final Set<String> NOT_REGISTERED = Set.of(
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection");

    private static final Logger log = LoggerFactory.getLogger(Membership.class);

    private final MeshkitProperties properties;
    private final String component;
    private final String instanceId;
    private final Client etcd;
    private final HealthStatusManager health;
    private final MeterRegistry metrics;
    private final InetSocketAddress admin;
    private List<String> services = List.of();
    private RegistrySession session;
    private boolean joined;
    private boolean left;

    /**
     * @param etcd null when {@code meshkit.registry.enabled} is false
     * @param health null when the server has no health service
     * @param metrics null for none
     * @param admin the admin endpoint's bound address, null when it is off
     */
    public Membership(MeshkitProperties properties, String component, String instanceId, Client etcd,
            HealthStatusManager health, MeterRegistry metrics, InetSocketAddress admin) {
        this.properties = properties;
        this.component = component;
        this.instanceId = instanceId;
        this.etcd = etcd;
        this.health = health;
        this.metrics = metrics;
        this.admin = admin;
    }

    /** Registers the started {@code server}'s services and reports them SERVING. */
    public synchronized void join(Server server) throws Exception {
        if (joined) {
            return;
        }
        joined = true;
        services = server.getServices().stream()
                .map(ServerServiceDefinition::getServiceDescriptor)
                .map(d -> d.getName())
                .filter(name -> !NOT_REGISTERED.contains(name))
                .sorted()
                .toList();
        InetSocketAddress bound = server.getListenSockets().stream()
                .filter(InetSocketAddress.class::isInstance)
                .map(InetSocketAddress.class::cast)
                .findFirst()
                .orElse(new InetSocketAddress("127.0.0.1", server.getPort()));
        List<String> endpoints = properties.getEtcd().getEndpoints();
        String addr = properties.getRegistry().getAdvertise().isBlank()
                ? Etcd.advertised(bound, endpoints)
                : properties.getRegistry().getAdvertise();
        if (etcd == null || !properties.getRegistry().isEnabled()) {
            log.info("serving {} on {} as {}; registration is off (meshkit.registry.enabled=false)", services, addr, instanceId);
        } else if (services.isEmpty()) {
            log.warn("the gRPC server on {} serves no service of its own: nothing to register", addr);
        } else {
            Map<String, String> metadata = new TreeMap<>();
            metadata.put("component", component);
            metadata.put("lang", "java");
            if (admin != null) {
                metadata.put("admin", Etcd.advertised(admin, endpoints));
            }
            MeshkitProperties.Registry registry = properties.getRegistry();
            String value = new Instance(addr, registry.getZone(), registry.getWeight(), registry.getVersion(), metadata).toJson();
            Map<String, String> entries = new LinkedHashMap<>();
            for (String service : services) {
                entries.put(Etcd.instanceKey(properties.getEtcd().getPrefix(), service, instanceId), value);
            }
            try {
                session = RegistrySession.start(etcd, registry.getTtlSecs(), entries);
            } catch (IllegalStateException e) {
                throw new IllegalStateException(e.getMessage() + " (meshkit.etcd.endpoints " + endpoints + ")", e.getCause());
            }
            if (metrics != null) {
                session.bindTo(metrics, instanceId);
            }
            log.info("serving {} on {} as {}, registered in etcd", services, addr, instanceId);
        }
        if (health != null) {
            for (String service : services) {
                health.setStatus(service, ServingStatus.SERVING);
            }
            health.setStatus(HealthStatusManager.SERVICE_NAME_ALL_SERVICES, ServingStatus.SERVING);
        }
    }

    /** NOT_SERVING, revoke the lease, wait {@code meshkit.server.drain-delay-ms}. Once. */
    public synchronized void leave() {
        if (left) {
            return;
        }
        left = true;
        long started = System.nanoTime();
        if (health != null) {
            health.setStatus(HealthStatusManager.SERVICE_NAME_ALL_SERVICES, ServingStatus.NOT_SERVING);
            for (String service : services) {
                health.setStatus(service, ServingStatus.NOT_SERVING);
            }
            // Nothing may report SERVING again (spring-grpc's actuator adapter, say).
            health.enterTerminalState();
        }
        if (session != null) {
            session.close();
            sleep(properties.getServer().getDrainDelayMs());
        }
        log.info("left the mesh: NOT_SERVING, lease revoked, waited {} ms for watchers; stopping the server",
                (System.nanoTime() - started) / 1_000_000);
    }

    /** The registration, once joined with registration on. */
    public Optional<RegistrySession> session() {
        return Optional.ofNullable(session);
    }

    /** The services registered (or, with registration off, served). */
    public synchronized List<String> services() {
        return services;
    }

    private static void sleep(long millis) {
        try {
            Thread.sleep(millis);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
