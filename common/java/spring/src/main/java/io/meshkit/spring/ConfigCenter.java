package io.meshkit.spring;

import java.util.ArrayList;
import java.util.Comparator;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Optional;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.function.Consumer;

import io.etcd.jetcd.Client;
import io.etcd.jetcd.KeyValue;
import io.etcd.jetcd.Watch;
import io.etcd.jetcd.kv.GetResponse;
import io.etcd.jetcd.options.GetOption;
import io.etcd.jetcd.options.WatchOption;
import io.etcd.jetcd.watch.WatchEvent;
import io.etcd.jetcd.watch.WatchResponse;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import tools.jackson.core.JacksonException;
import tools.jackson.databind.JsonNode;
import tools.jackson.databind.json.JsonMapper;
import tools.jackson.databind.node.ObjectNode;

/**
 * The config center (common/registry's config_center.rs): settings under
 * {@code {prefix}/config/_global/{path}} for every process, then
 * {@code {prefix}/config/{component}/{path}}, which wins; {@code path} is a
 * dotted setting path, the value JSON, merged into the tree at that path
 * (objects deeply, anything else replaced), shorter paths first. Both scopes
 * are read at one revision and watched from the next; any change re-reads
 * them. {@code log.filter} is applied to the loggers at once; every other
 * changed path is handed to the listener as a {@link ConfigChangedEvent}. A
 * change that does not parse is refused as a whole, with the reason logged,
 * and the last good settings stay.
 */
public final class ConfigCenter implements AutoCloseable {

    public static final String LOG_FILTER = "log.filter";
    private static final Logger log = LoggerFactory.getLogger(ConfigCenter.class);
    private static final JsonMapper JSON = JsonMapper.builder().build();

    /** One setting as stored: {@code scope} is {@code _global} or the component. */
    public record Entry(String scope, String path, String value, long modRevision) {
    }

    private final Client client;
    private final String prefix;
    private final String component;
    private final LogFilter.Applier logs;
    private final Consumer<ConfigChangedEvent> listener;
    /** Reads, applies and re-watches one at a time. */
    private final ScheduledExecutorService executor;
    private volatile Map<String, JsonNode> entries = Map.of();
    private volatile ObjectNode settings = JSON.createObjectNode();
    private volatile long revision;
    private volatile String lastRejection;
    private String logFilter;
    private Watch.Watcher watcher;
    private long retryDelayMs = 100;
    private volatile boolean closed;

    private ConfigCenter(Client client, String prefix, String component, LogFilter.Applier logs,
            Consumer<ConfigChangedEvent> listener) {
        this.client = client;
        this.prefix = prefix;
        this.component = component;
        this.logs = logs;
        this.listener = listener;
        this.executor = Executors.newSingleThreadScheduledExecutor(runnable -> {
            Thread thread = new Thread(runnable, "meshkit-config");
            thread.setDaemon(true);
            return thread;
        });
    }

    /**
     * Reads the settings of {@code component} (riding out an etcd that does not
     * answer for up to 10 s) and applies them before returning; then watches.
     */
    public static ConfigCenter start(Client client, String prefix, String component, LogFilter.Applier logs,
            Consumer<ConfigChangedEvent> listener) throws Exception {
        ConfigCenter center = new ConfigCenter(client, prefix, component, logs, listener);
        long deadline = System.nanoTime() + Etcd.START_PATIENCE.toNanos();
        while (true) {
            try {
                center.executor.submit(() -> {
                    center.reload();
                    return null;
                }).get();
                break;
            } catch (java.util.concurrent.ExecutionException e) {
                if (!Etcd.unavailable(e.getCause()) || System.nanoTime() > deadline) {
                    center.close();
                    throw new IllegalStateException("reading the config center failed: " + Etcd.describe(e.getCause()), e.getCause());
                }
                log.info("etcd is unavailable ({}), trying again", Etcd.describe(e.getCause()));
                Thread.sleep(RegistrySession.RETRY.toMillis());
            }
        }
        center.executor.execute(() -> center.watch(center.revision + 1));
        return center;
    }

    /** The value in force at a dotted {@code path} (inside a larger object too), if any. */
    public Optional<JsonNode> get(String path) {
        JsonNode node = settings.at("/" + path.replace('.', '/'));
        return node.isMissingNode() ? Optional.empty() : Optional.of(node.deepCopy());
    }

    /** Every path stored in etcd for this process and its value in force (the component's over the global one). */
    public Map<String, JsonNode> entries() {
        return entries;
    }

    /** The merged tree of every setting in force. */
    public JsonNode settings() {
        return settings.deepCopy();
    }

    /** The etcd revision the settings in force were read at. */
    public long revision() {
        return revision;
    }

    /** The last refused change and why. */
    public Optional<String> lastRejection() {
        return Optional.ofNullable(lastRejection);
    }

    @Override
    public synchronized void close() {
        if (closed) {
            return;
        }
        closed = true;
        executor.execute(() -> {
            if (watcher != null) {
                watcher.close();
            }
        });
        executor.shutdown();
    }

    /** Reads both scopes at one revision and applies them. Runs on the executor. */
    private void reload() throws Exception {
        List<Entry> read = new ArrayList<>();
        String global = Etcd.configPrefix(prefix, Etcd.GLOBAL);
        GetResponse first = Etcd.await(client.getKVClient()
                .get(Etcd.bytes(global), GetOption.builder().isPrefix(true).build()));
        long at = first.getHeader().getRevision();
        collect(first, Etcd.GLOBAL, global, read);
        String own = Etcd.configPrefix(prefix, component);
        collect(Etcd.await(client.getKVClient()
                .get(Etcd.bytes(own), GetOption.builder().isPrefix(true).withRevision(at).build())), component, own, read);
        apply(read, at);
    }

    private static void collect(GetResponse response, String scope, String root, List<Entry> into) {
        for (KeyValue kv : response.getKvs()) {
            String path = Etcd.string(kv.getKey()).substring(root.length());
            into.add(new Entry(scope, path, Etcd.string(kv.getValue()), kv.getModRevision()));
        }
    }

    private void apply(List<Entry> read, long at) {
        ObjectNode tree = JSON.createObjectNode();
        Map<String, JsonNode> flat = new LinkedHashMap<>();
        String filter;
        LogFilter parsed = null;
        try {
            List<Entry> ordered = new ArrayList<>(read);
            ordered.sort(Comparator.comparing((Entry e) -> !e.scope().equals(Etcd.GLOBAL))
                    .thenComparingInt(e -> e.path().split("\\.", -1).length)
                    .thenComparing(Entry::path));
            for (Entry entry : ordered) {
                String where = entry.scope() + "/" + entry.path();
                JsonNode value;
                try {
                    value = JSON.readTree(entry.value());
                } catch (JacksonException e) {
                    throw new IllegalArgumentException(where + ": \"" + entry.value() + "\" is not JSON (" + e.getOriginalMessage() + ")");
                }
                setPath(tree, entry.path(), value, where);
                flat.put(entry.path(), value);
            }
            JsonNode node = tree.at("/log/filter");
            if (node.isMissingNode() || node.isNull()) {
                filter = null;
            } else if (!node.isString()) {
                throw new IllegalArgumentException("log.filter: " + node + " is not a string");
            } else {
                filter = node.stringValue();
                try {
                    parsed = LogFilter.parse(filter);
                } catch (IllegalArgumentException e) {
                    throw new IllegalArgumentException("log.filter: \"" + filter + "\" is not a valid filter: " + e.getMessage());
                }
            }
        } catch (IllegalArgumentException e) {
            lastRejection = "revision " + at + ": " + e.getMessage();
            log.warn("config: change at revision {} refused, the last good settings stay: {}", at, e.getMessage());
            return;
        }
        Map<String, JsonNode> before = entries;
        entries = Map.copyOf(flat);
        settings = tree;
        revision = at;
        if (!Objects.equals(filter, logFilter)) {
            logs.apply(parsed);
            logFilter = filter;
            if (filter == null) {
                log.info("config: log.filter removed, the process's own log levels are back");
            } else {
                log.info("config: log.filter is now \"{}\"", filter);
            }
        }
        Set<String> paths = new TreeSet<>(before.keySet());
        paths.addAll(flat.keySet());
        Set<String> changed = new HashSet<>();
        for (String path : paths) {
            if (!Objects.equals(before.get(path), flat.get(path))) {
                changed.add(path);
                if (!path.equals(LOG_FILTER)) {
                    JsonNode value = flat.get(path);
                    listener.accept(new ConfigChangedEvent(path, value == null ? null : value.toString()));
                }
            }
        }
        if (!changed.isEmpty()) {
            log.info("config: settings changed at revision {}: {}", at, new TreeSet<>(changed));
        }
    }

    /** Sets {@code value} at the dotted {@code path}: objects merge deeply, anything else replaces. */
    private static void setPath(ObjectNode tree, String path, JsonNode value, String at) {
        String[] segments = path.split("\\.", -1);
        for (String segment : segments) {
            if (segment.isEmpty()) {
                throw new IllegalArgumentException(at + ": \"" + path + "\" is not a dotted setting path");
            }
        }
        ObjectNode here = tree;
        for (int i = 0; i < segments.length - 1; i++) {
            JsonNode next = here.get(segments[i]);
            if (next == null) {
                next = here.putObject(segments[i]);
            } else if (!next.isObject()) {
                throw new IllegalArgumentException(at + ": `" + segments[i] + "` is a value, not a table");
            }
            here = (ObjectNode) next;
        }
        String last = segments[segments.length - 1];
        JsonNode existing = here.get(last);
        if (existing instanceof ObjectNode base && value instanceof ObjectNode over) {
            deepMerge(base, over);
        } else {
            here.set(last, value.deepCopy());
        }
    }

    private static void deepMerge(ObjectNode base, ObjectNode over) {
        for (Map.Entry<String, JsonNode> e : over.properties()) {
            if (base.get(e.getKey()) instanceof ObjectNode b && e.getValue() instanceof ObjectNode o) {
                deepMerge(b, o);
            } else {
                base.set(e.getKey(), e.getValue().deepCopy());
            }
        }
    }

    /** Watches {@code {prefix}/config/} from {@code from}; runs on the executor. */
    private void watch(long from) {
        if (closed) {
            return;
        }
        String root = Etcd.configRoot(prefix);
        String globalRoot = Etcd.configPrefix(prefix, Etcd.GLOBAL);
        String ownRoot = Etcd.configPrefix(prefix, component);
        WatchOption option = WatchOption.builder().isPrefix(true).withRevision(from).build();
        watcher = client.getWatchClient().watch(Etcd.bytes(root), option, Watch.listener((WatchResponse response) -> {
            boolean relevant = response.getEvents().stream()
                    .map(WatchEvent::getKeyValue)
                    .map(kv -> Etcd.string(kv.getKey()))
                    .anyMatch(key -> key.startsWith(globalRoot) || key.startsWith(ownRoot));
            if (relevant) {
                run(this::reloadQuietly);
            }
        }, error -> run(() -> rewatch(error))));
    }

    /**
     * The watch ended (a broken stream, a compaction, a halt error): jetcd
     * resumes some of these by itself and ends the watcher on others, so end it
     * in every case, read everything afresh (which covers the gap, compaction
     * included) and watch from the revision read.
     */
    private void rewatch(Throwable error) {
        if (closed) {
            return;
        }
        if (watcher != null) {
            watcher.close();
            watcher = null;
        }
        try {
            reload();
            retryDelayMs = 100;
            log.debug("config: watch ended ({}), watching again from revision {}", error, revision + 1);
            watch(revision + 1);
        } catch (Exception e) {
            retryDelayMs = Math.min(2000, retryDelayMs * 2);
            executor.schedule(() -> rewatch(error), retryDelayMs, TimeUnit.MILLISECONDS);
        }
    }

    private void reloadQuietly() {
        if (closed) {
            return;
        }
        try {
            reload();
        } catch (Exception e) {
            log.debug("config: reading after a change failed ({}), trying again", e.toString());
            executor.schedule(this::reloadQuietly, RegistrySession.RETRY.toMillis(), TimeUnit.MILLISECONDS);
        }
    }

    private void run(Runnable task) {
        try {
            if (!closed) {
                executor.execute(task);
            }
        } catch (java.util.concurrent.RejectedExecutionException e) {
            // Closed meanwhile.
        }
    }
}
