package io.meshkit.spring;

import java.io.File;
import java.io.IOException;
import java.net.ServerSocket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Comparator;
import java.util.stream.Stream;

/** A real, throwaway etcd on free loopback ports in a temporary folder. */
final class EtcdProcess implements AutoCloseable {

    private final Process process;
    private final Path dataDir;
    final String endpoint;

    private EtcdProcess(Process process, Path dataDir, String endpoint) {
        this.process = process;
        this.dataDir = dataDir;
        this.endpoint = endpoint;
    }

    static EtcdProcess start() throws Exception {
        Path dir = Files.createTempDirectory("meshkit-etcd");
        int client = freePort();
        int peer = freePort();
        String clientUrl = "http://127.0.0.1:" + client;
        String peerUrl = "http://127.0.0.1:" + peer;
        Process process = new ProcessBuilder(binary(), "--name", "default", "--data-dir", dir.resolve("data").toString(),
                "--listen-client-urls", clientUrl, "--advertise-client-urls", clientUrl,
                "--listen-peer-urls", peerUrl, "--initial-advertise-peer-urls", peerUrl,
                "--initial-cluster", "default=" + peerUrl)
                .redirectErrorStream(true)
                .redirectOutput(dir.resolve("etcd.log").toFile())
                .start();
        EtcdProcess etcd = new EtcdProcess(process, dir, clientUrl);
        HttpClient http = HttpClient.newHttpClient();
        long deadline = System.nanoTime() + Duration.ofSeconds(15).toNanos();
        while (true) {
            try {
                HttpResponse<String> health = http.send(HttpRequest.newBuilder(URI.create(clientUrl + "/health"))
                        .timeout(Duration.ofSeconds(1)).build(), HttpResponse.BodyHandlers.ofString());
                if (health.statusCode() == 200 && health.body().contains("true")) {
                    return etcd;
                }
            } catch (IOException e) {
                // Not listening yet.
            }
            if (!process.isAlive() || System.nanoTime() > deadline) {
                String log = Files.readString(dir.resolve("etcd.log"));
                etcd.close();
                throw new IllegalStateException("etcd did not start:\n" + log);
            }
            Thread.sleep(100);
        }
    }

    private static String binary() {
        if (new File("/usr/bin/etcd").canExecute()) {
            return "/usr/bin/etcd";
        }
        return Stream.of(System.getenv().getOrDefault("PATH", "").split(File.pathSeparator))
                .map(p -> new File(p, "etcd"))
                .filter(File::canExecute)
                .map(File::getPath)
                .findFirst()
                .orElseThrow(() -> new IllegalStateException("the tests need etcd on PATH"));
    }

    private static int freePort() throws IOException {
        try (ServerSocket socket = new ServerSocket(0, 1, java.net.InetAddress.getLoopbackAddress())) {
            return socket.getLocalPort();
        }
    }

    /** SIGSTOP (true) or SIGCONT (false): an etcd that stops answering without closing a connection. */
    void pause(boolean stop) throws Exception {
        new ProcessBuilder("kill", stop ? "-STOP" : "-CONT", Long.toString(process.pid())).inheritIO().start().waitFor();
    }

    @Override
    public void close() throws Exception {
        pause(false);
        process.destroy();
        process.waitFor();
        try (Stream<Path> files = Files.walk(dataDir)) {
            files.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
        }
    }
}
