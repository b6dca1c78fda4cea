package io.meshkit.spring;

import java.util.ArrayList;
import java.util.List;

import org.springframework.boot.context.properties.ConfigurationProperties;

/**
 * The {@code meshkit.*} settings, named as the Rust services name theirs, so
 * that the same {@code MESHKIT_*} environment variables configure both
 * ({@code MESHKIT_ETCD_ENDPOINTS}, {@code MESHKIT_REGISTRY_TTL_SECS}, …).
 * A plain Java program fills one in with the setters.
 */
@ConfigurationProperties("meshkit")
public class MeshkitProperties {

    /** The component this process is ({@code user}, {@code order}, …); default: spring.application.name. */
    private String component = "";

    private final Etcd etcd = new Etcd();
    private final Registry registry = new Registry();
    private final Server server = new Server();
    private final Admin admin = new Admin();
    private final Config config = new Config();

    public String getComponent() {
        return component;
    }

    public void setComponent(String component) {
        this.component = component;
    }

    public Etcd getEtcd() {
        return etcd;
    }

    public Registry getRegistry() {
        return registry;
    }

    public Server getServer() {
        return server;
    }

    public Admin getAdmin() {
        return admin;
    }

    public Config getConfig() {
        return config;
    }

    /** Checks ranges and formats as the Rust settings do; the message names the setting. */
    public void validate() {
        if (etcd.endpoints.isEmpty() || etcd.endpoints.stream().anyMatch(e -> e.isBlank() || e.contains(" "))) {
            throw new IllegalArgumentException("meshkit.etcd.endpoints: " + etcd.endpoints + " is not a list of host:port");
        }
        if (!etcd.prefix.startsWith("/") || etcd.prefix.endsWith("/")) {
            throw new IllegalArgumentException("meshkit.etcd.prefix: \"" + etcd.prefix + "\" must start with / and not end with /");
        }
        if (registry.ttlSecs < 2 || registry.ttlSecs > 3600) {
            throw new IllegalArgumentException("meshkit.registry.ttl-secs: " + registry.ttlSecs + " is outside 2..3600");
        }
        if (registry.weight < 1 || registry.weight > 10_000) {
            throw new IllegalArgumentException("meshkit.registry.weight: " + registry.weight + " is outside 1..10000");
        }
        if (registry.instanceId.contains("/")) {
            throw new IllegalArgumentException("meshkit.registry.instance-id: must not contain /");
        }
    }

    public static class Etcd {
        /** {@code host:port} or {@code http://host:port}, one or more (comma-separated in the environment). */
        private List<String> endpoints = new ArrayList<>(List.of("http://127.0.0.1:2379"));
        /** Root of every meshkit key. */
        private String prefix = "/meshkit";

        public List<String> getEndpoints() {
            return endpoints;
        }

        public void setEndpoints(List<String> endpoints) {
            this.endpoints = endpoints;
        }

        public String getPrefix() {
            return prefix;
        }

        public void setPrefix(String prefix) {
            this.prefix = prefix;
        }
    }

    public static class Registry {
        /** Whether the server registers itself in etcd at all. */
        private boolean enabled = true;
        /** Lease TTL; keepalives go out at about a third of it. */
        private long ttlSecs = 10;
        /** Empty: the component name and a random suffix. */
        private String instanceId = "";
        private String zone = "";
        private int weight = 100;
        private String version = "java";
        /** {@code host:port} callers reach the gRPC server at; empty: the bound address. */
        private String advertise = "";

        public boolean isEnabled() {
            return enabled;
        }

        public void setEnabled(boolean enabled) {
            this.enabled = enabled;
        }

        public long getTtlSecs() {
            return ttlSecs;
        }

        public void setTtlSecs(long ttlSecs) {
            this.ttlSecs = ttlSecs;
        }

        public String getInstanceId() {
            return instanceId;
        }

        public void setInstanceId(String instanceId) {
            this.instanceId = instanceId;
        }

        public String getZone() {
            return zone;
        }

        public void setZone(String zone) {
            this.zone = zone;
        }

        public int getWeight() {
            return weight;
        }

        public void setWeight(int weight) {
            this.weight = weight;
        }

        public String getVersion() {
            return version;
        }

        public void setVersion(String version) {
            this.version = version;
        }

        public String getAdvertise() {
            return advertise;
        }

        public void setAdvertise(String advertise) {
            this.advertise = advertise;
        }
    }

    public static class Server {
        /** {@code host:port} the gRPC server binds; with Spring it becomes spring.grpc.server.address. */
        private String listen = "";
        /** After the lease is revoked, how long watchers get to drop this instance. */
        private long drainDelayMs = 500;
        /** How long in-flight calls get to finish once the server stops accepting. */
        private long drainTimeoutMs = 5000;

        public String getListen() {
            return listen;
        }

        public void setListen(String listen) {
            this.listen = listen;
        }

        public long getDrainDelayMs() {
            return drainDelayMs;
        }

        public void setDrainDelayMs(long drainDelayMs) {
            this.drainDelayMs = drainDelayMs;
        }

        public long getDrainTimeoutMs() {
            return drainTimeoutMs;
        }

        public void setDrainTimeoutMs(long drainTimeoutMs) {
            this.drainTimeoutMs = drainTimeoutMs;
        }
    }

    public static class Admin {
        private boolean enabled = true;
        /** {@code host:port} of /healthz and /metrics; port 0 picks a free one. */
        private String listen = "127.0.0.1:0";

        public boolean isEnabled() {
            return enabled;
        }

        public void setEnabled(boolean enabled) {
            this.enabled = enabled;
        }

        public String getListen() {
            return listen;
        }

        public void setListen(String listen) {
            this.listen = listen;
        }
    }

    public static class Config {
        /** Whether settings are read and watched under {prefix}/config/. */
        private boolean enabled = true;

        public boolean isEnabled() {
            return enabled;
        }

        public void setEnabled(boolean enabled) {
            this.enabled = enabled;
        }
    }
}
