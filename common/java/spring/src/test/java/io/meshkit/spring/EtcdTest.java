package io.meshkit.spring;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;
import java.util.stream.Stream;

import io.etcd.jetcd.Client;
import org.junit.jupiter.api.Test;

class EtcdTest {

    /**
     * jetcd runs on Vert.x, which by default makes a {@code vertx-cache-*}
     * directory in the temp dir for each instance and removes it only when
     * closed: every killed process left one behind.
     */
    @Test
    void aClientMakesNoVertxCacheDirectory() throws Exception {
        Path tmp = Path.of(System.getProperty("java.io.tmpdir"));
        Set<Path> before = cacheDirs(tmp);
        try (Client client = Etcd.connect(List.of("127.0.0.1:1"))) {
            // A call, so whatever the client starts lazily has started.
            try {
                client.getKVClient().get(Etcd.bytes("/any")).get(200, TimeUnit.MILLISECONDS);
            } catch (Exception expected) {
                // Nothing listens there.
            }
            Set<Path> made = new HashSet<>(cacheDirs(tmp));
            made.removeAll(before);
            assertEquals(Set.of(), made, "cache directories made by the etcd client");
        }
    }

    private static Set<Path> cacheDirs(Path tmp) throws IOException {
        try (Stream<Path> entries = Files.list(tmp)) {
            return entries.filter(p -> p.getFileName().toString().startsWith("vertx-cache")).collect(Collectors.toSet());
        }
    }
}
