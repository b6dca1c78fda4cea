package io.meshkit.spring;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import io.micrometer.prometheusmetrics.PrometheusMeterRegistry;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The admin endpoint on the JDK's HTTP server (no servlet container):
 * {@code GET /healthz} answers {@code ok}, {@code GET /metrics} the Prometheus
 * text of a Micrometer registry. Its address goes into the registration's
 * {@code metadata.admin}, where {@code meshctl prometheus-sd} finds it.
 */
public final class AdminServer implements AutoCloseable {

    private static final Logger log = LoggerFactory.getLogger(AdminServer.class);

    private final HttpServer server;
    private final ExecutorService executor;

    private AdminServer(HttpServer server, ExecutorService executor) {
        this.server = server;
        this.executor = executor;
    }

    /** Binds {@code listen} ({@code host:port}, port 0 for a free one) and serves. */
    public static AdminServer start(String listen, PrometheusMeterRegistry registry) throws IOException {
        HttpServer server = HttpServer.create(Etcd.parseHostPort("meshkit.admin.listen", listen), 64);
        server.createContext("/", exchange -> {
            try (exchange) {
                String path = exchange.getRequestURI().getPath();
                if (!exchange.getRequestMethod().equals("GET") && !exchange.getRequestMethod().equals("HEAD")) {
                    reply(exchange, 405, "text/plain; charset=utf-8", "method not allowed\n");
                } else if (path.equals("/healthz")) {
                    reply(exchange, 200, "text/plain; charset=utf-8", "ok\n");
                } else if (path.equals("/metrics")) {
                    reply(exchange, 200, "text/plain; version=0.0.4; charset=utf-8", registry.scrape());
                } else {
                    reply(exchange, 404, "text/plain; charset=utf-8", "not found\n");
                }
            }
        });
        ExecutorService executor = Executors.newFixedThreadPool(2, runnable -> {
            Thread thread = new Thread(runnable, "meshkit-admin");
            thread.setDaemon(true);
            return thread;
        });
        server.setExecutor(executor);
        server.start();
        AdminServer admin = new AdminServer(server, executor);
        log.info("admin endpoint (/healthz, /metrics) on {}",
                Etcd.hostPort(admin.address().getHostString(), admin.address().getPort()));
        return admin;
    }

    private static void reply(HttpExchange exchange, int status, String contentType, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", contentType);
        boolean head = exchange.getRequestMethod().equals("HEAD");
        exchange.sendResponseHeaders(status, head ? -1 : bytes.length);
        if (!head) {
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(bytes);
            }
        }
    }

    /** The bound address. */
    public InetSocketAddress address() {
        return server.getAddress();
    }

    @Override
    public void close() {
        server.stop(0);
        executor.shutdownNow();
    }
}
