package io.meshkit.spring;

import java.net.DatagramSocket;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import io.etcd.jetcd.ByteSequence;
import io.etcd.jetcd.Client;
import io.etcd.jetcd.common.exception.ErrorCode;
import io.etcd.jetcd.common.exception.EtcdException;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;

/** The etcd keyspace (docs/REGISTRY.md) and what every etcd caller here shares. */
public final class Etcd {

    /** How long one etcd call may take, so a stopped etcd never hangs a caller. */
    static final Duration CALL_TIMEOUT = Duration.ofSeconds(3);
    /** How long a starting process waits out an etcd that does not answer. */
    static final Duration START_PATIENCE = Duration.ofSeconds(10);
    /** The global scope of the config center. */
    public static final String GLOBAL = "_global";

    static {
        // jetcd runs on Vert.x, which keeps a cache directory in the temp dir
        // per instance for resolving files on the classpath, and removes it
        // only when closed: every killed process left one behind. Nothing
        // here reads files through Vert.x. Set before jetcd loads Vert.x,
        // whose options read it once; a value set by the user stands.
        if (System.getProperty("vertx.disableFileCPResolving") == null) {
            System.setProperty("vertx.disableFileCPResolving", "true");
        }
    }

    private Etcd() {
    }

    /** A client of {@code endpoints} ({@code host:port} or {@code http://host:port}). */
    public static Client connect(List<String> endpoints) {
        URI[] uris = endpoints.stream()
                .map(String::trim)
                .map(e -> URI.create(e.contains("://") ? e : "http://" + e))
                .toArray(URI[]::new);
        return Client.builder().endpoints(uris).connectTimeout(Duration.ofSeconds(2)).build();
    }

    /** {@code {prefix}/services/{service}/{instance_id}}. */
    public static String instanceKey(String prefix, String service, String instanceId) {
        return prefix + "/services/" + service + "/" + instanceId;
    }

    /** {@code {prefix}/config/}: every setting of every component. */
    public static String configRoot(String prefix) {
        return prefix + "/config/";
    }

    /** {@code {prefix}/config/{scope}/}: one component's settings, or {@code _global}'s. */
    public static String configPrefix(String prefix, String scope) {
        return prefix + "/config/" + scope + "/";
    }

    static ByteSequence bytes(String s) {
        return ByteSequence.from(s, StandardCharsets.UTF_8);
    }

    static String string(ByteSequence b) {
        return b.toString(StandardCharsets.UTF_8);
    }

    /** Waits for an etcd call, at most {@link #CALL_TIMEOUT}; the cause unwrapped. */
    static <T> T await(CompletableFuture<T> future) throws Exception {
        return await(future, CALL_TIMEOUT);
    }

    /** Waits for an etcd call, at most {@code timeout}; the cause unwrapped. */
    static <T> T await(CompletableFuture<T> future, Duration timeout) throws Exception {
        try {
            return future.get(timeout.toMillis(), TimeUnit.MILLISECONDS);
        } catch (ExecutionException | CompletionException e) {
            throw e.getCause() instanceof Exception cause ? cause : e;
        } catch (TimeoutException e) {
            future.cancel(true);
            throw e;
        }
    }

    /** What went wrong, in a log line's words. */
    static String describe(Throwable t) {
        return t instanceof TimeoutException ? "etcd did not answer in time" : t.toString();
    }

    /** etcd answered that the lease does not exist (a keepalive's TTL 0, a put under a revoked lease). */
    static boolean leaseNotFound(Throwable t) {
        String message = String.valueOf(t.getMessage());
        return (t instanceof EtcdException e && e.getErrorCode() == ErrorCode.NOT_FOUND)
                || message.contains("lease not found");
    }

    /** The call could not be served (no member answering, no leader, a timeout): worth trying again. */
    static boolean unavailable(Throwable t) {
        if (t instanceof TimeoutException) {
            return true;
        }
        if (t instanceof EtcdException e) {
            return e.getErrorCode() == ErrorCode.UNAVAILABLE || e.getErrorCode() == ErrorCode.DEADLINE_EXCEEDED
                    || String.valueOf(e.getMessage()).contains("no leader");
        }
        if (t instanceof StatusRuntimeException s) {
            Status.Code code = s.getStatus().getCode();
            return code == Status.Code.UNAVAILABLE || code == Status.Code.DEADLINE_EXCEEDED;
        }
        return t.getCause() != null && t.getCause() != t && unavailable(t.getCause());
    }

    /**
     * The address to register for a socket bound to {@code bound}: itself, or,
     * when bound to every interface (as in a container), the address of the
     * interface that routes to etcd, the one the rest of the mesh reaches (a
     * UDP connect picks the route without sending anything). As common/mesh does.
     */
    public static String advertised(InetSocketAddress bound, List<String> etcdEndpoints) {
        InetAddress ip = bound.getAddress();
        if (ip != null && !ip.isAnyLocalAddress()) {
            return hostPort(ip.getHostAddress(), bound.getPort());
        }
        for (String endpoint : etcdEndpoints) {
            URI uri = URI.create(endpoint.contains("://") ? endpoint.trim() : "http://" + endpoint.trim());
            if (uri.getHost() == null || uri.getPort() < 0) {
                continue;
            }
            try (DatagramSocket socket = new DatagramSocket()) {
                socket.connect(new InetSocketAddress(uri.getHost(), uri.getPort()));
                InetAddress local = socket.getLocalAddress();
                if (local != null && !local.isAnyLocalAddress()) {
                    return hostPort(local.getHostAddress(), bound.getPort());
                }
            } catch (Exception e) {
                // Not resolvable or no route: try the next endpoint.
            }
        }
        return hostPort("127.0.0.1", bound.getPort());
    }

    static String hostPort(String host, int port) {
        return (host.contains(":") ? "[" + host + "]" : host) + ":" + port;
    }

    /** {@code host:port} as an address to bind ({@code [::1]:0} too). */
    static InetSocketAddress parseHostPort(String setting, String value) {
        URI uri = URI.create("tcp://" + value.trim());
        if (uri.getHost() == null || uri.getPort() < 0) {
            throw new IllegalArgumentException(setting + ": \"" + value + "\" is not an address like 127.0.0.1:0");
        }
        return new InetSocketAddress(uri.getHost(), uri.getPort());
    }
}
