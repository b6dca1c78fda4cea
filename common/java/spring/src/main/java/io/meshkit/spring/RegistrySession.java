package io.meshkit.spring;

import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

import io.etcd.jetcd.Client;
import io.etcd.jetcd.Watch;
import io.etcd.jetcd.kv.GetResponse;
import io.etcd.jetcd.kv.PutResponse;
import io.etcd.jetcd.options.GetOption;
import io.etcd.jetcd.options.PutOption;
import io.etcd.jetcd.options.WatchOption;
import io.etcd.jetcd.watch.WatchEvent;
import io.etcd.jetcd.watch.WatchResponse;
import io.micrometer.core.instrument.FunctionCounter;
import io.micrometer.core.instrument.Gauge;
import io.micrometer.core.instrument.MeterRegistry;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Keeps a set of keys in etcd under one lease: the registry contract's session
 * (docs/REGISTRY.md), as common/registry's RegistrySession keeps it.
 *
 * <p>Grant, put every key with the lease, then one keepalive at about a third
 * of the TTL (with jitter, so a fleet started together does not beat in step),
 * each on a new stream ({@code keepAliveOnce}, so the timing is this class's).
 * A keepalive answered with TTL 0 means the lease is gone (expired during an
 * outage, or revoked): grant a new one and put every key again. A keepalive
 * that fails or is not answered within a quarter of the TTL says nothing about
 * the lease (etcd expires none while it has no leader): try again at once and
 * then every 300 ms, keeping the lease. A key deleted while the lease lives
 * (seen by watching the keys) is put back. {@link #close()} revokes the lease,
 * which removes every key at once.
 */
public final class RegistrySession implements AutoCloseable {

    public enum State { REGISTERED, RECONNECTING, CLOSED }

    private static final Logger log = LoggerFactory.getLogger(RegistrySession.class);
    /** Between tries while etcd does not answer. */
    static final Duration RETRY = Duration.ofMillis(300);
    private static final Object WAKE = new Object();

    private final Client client;
    private final long ttlSecs;
    private final Map<String, String> entries;
    private final BlockingQueue<Object> wakeups = new LinkedBlockingQueue<>();
    /** Keys seen deleted and not yet put back. */
    private final Set<String> missing = ConcurrentHashMap.newKeySet();
    private final List<Watch.Watcher> watchers = new ArrayList<>();
    private final AtomicLong reregistrations = new AtomicLong();
    private final Thread worker;
    private volatile boolean rewatch;
    private volatile boolean closing;
    private volatile long leaseId;
    private volatile State state = State.RECONNECTING;
    /** Why the last call failed, for the log. */
    private String lastError = "";

    private RegistrySession(Client client, long ttlSecs, Map<String, String> entries) {
        this.client = client;
        this.ttlSecs = ttlSecs;
        this.entries = new LinkedHashMap<>(entries);
        this.worker = new Thread(this::run, "meshkit-registry");
        this.worker.setDaemon(true);
    }

    /**
     * Grants a lease and writes {@code entries} (key → JSON value) under it
     * before returning, riding out an etcd that does not answer for up to 10 s
     * (a leader election, a member restarting); then keeps them alive.
     */
    public static RegistrySession start(Client client, long ttlSecs, Map<String, String> entries) throws Exception {
        RegistrySession session = new RegistrySession(client, ttlSecs, entries);
        long deadline = System.nanoTime() + Etcd.START_PATIENCE.toNanos();
        long revision;
        while (true) {
            try {
                revision = session.register();
                break;
            } catch (Exception e) {
                if (!Etcd.unavailable(e) || System.nanoTime() > deadline) {
                    throw new IllegalStateException("registering in etcd failed: " + Etcd.describe(e), e);
                }
                log.info("etcd is unavailable ({}), trying again", Etcd.describe(e));
                Thread.sleep(RETRY.toMillis());
            }
        }
        session.state = State.REGISTERED;
        session.watch(revision + 1);
        session.worker.start();
        return session;
    }

    public State state() {
        return state;
    }

    /** The lease the keys are bound to now (0 before the first registration). */
    public long leaseId() {
        return leaseId;
    }

    /** Times the keys were written again: under a new lease, or one key put back. */
    public long reregistrations() {
        return reregistrations.get();
    }

    /**
     * {@code meshkit_registry_session_up} and {@code meshkit_registry_reregistrations_total},
     * labelled with {@code instance_id}, as the Rust session reports them.
     */
    public void bindTo(MeterRegistry registry, String instanceId) {
        Gauge.builder("meshkit.registry.session.up", this, s -> s.state == State.REGISTERED ? 1 : 0)
                .description("1 while the instance's keys are in etcd under a live lease, 0 while re-registering.")
                .tag("instance_id", instanceId)
                .register(registry);
        FunctionCounter.builder("meshkit.registry.reregistrations", this, s -> s.reregistrations.get())
                .description("Times the instance wrote its keys again: a new lease after losing one, or a key deleted from outside.")
                .tag("instance_id", instanceId)
                .register(registry);
    }

    /** Stops the keepalives and revokes the lease, removing every key at once. */
    @Override
    public synchronized void close() {
        if (closing) {
            return;
        }
        closing = true;
        wakeups.offer(WAKE);
        try {
            worker.join(Etcd.CALL_TIMEOUT.toMillis() * 2);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
        closeWatchers();
        long lease = leaseId;
        try {
            Etcd.await(client.getLeaseClient().revoke(lease));
            log.info("lease {} revoked: the instance's keys are gone", Long.toHexString(lease));
        } catch (Exception e) {
            log.warn("revoking lease {} failed ({}); the keys expire by TTL", Long.toHexString(lease), e.toString());
        }
        state = State.CLOSED;
    }

    /** Grants a lease and puts every key under it (answerTimeout() per call); the revision of the last put. */
    private long register() throws Exception {
        long lease = Etcd.await(client.getLeaseClient().grant(ttlSecs), answerTimeout()).getID();
        long revision = 0;
        try {
            for (Map.Entry<String, String> e : entries.entrySet()) {
                revision = put(e.getKey(), e.getValue(), lease).getHeader().getRevision();
            }
        } catch (Exception e) {
            revokeQuietly(lease);
            throw e;
        }
        if (closing && leaseId != 0) {
            // close() is revoking the previous lease: do not leave this one behind.
            revokeQuietly(lease);
            return revision;
        }
        leaseId = lease;
        log.info("registered in etcd: lease {} (TTL {} s), keys {}", Long.toHexString(lease), ttlSecs, entries.keySet());
        return revision;
    }

    private PutResponse put(String key, String value, long lease) throws Exception {
        PutOption option = PutOption.builder().withLeaseId(lease).build();
        return Etcd.await(client.getKVClient().put(Etcd.bytes(key), Etcd.bytes(value), option), answerTimeout());
    }

    private void revokeQuietly(long lease) {
        try {
            Etcd.await(client.getLeaseClient().revoke(lease));
        } catch (Exception ignored) {
            // It expires by TTL.
        }
    }

    private enum Outcome { OK, BROKEN, LOST }

    private void run() {
        long keepAliveAt = System.nanoTime() + keepAliveInterval();
        long retryAt = 0;
        while (!closing) {
            long now = System.nanoTime();
            long wakeAt = rewatch || !missing.isEmpty() ? Math.min(keepAliveAt, retryAt) : keepAliveAt;
            try {
                if (wakeAt > now) {
                    wakeups.poll(wakeAt - now, TimeUnit.NANOSECONDS);
                }
            } catch (InterruptedException e) {
                return;
            }
            if (closing) {
                return;
            }
            wakeups.clear();
            Outcome outcome = Outcome.OK;
            if (System.nanoTime() >= keepAliveAt) {
                outcome = keepAlive();
                if (outcome == Outcome.OK) {
                    keepAliveAt = System.nanoTime() + keepAliveInterval();
                }
            }
            if (outcome == Outcome.OK && rewatch) {
                outcome = rewatch();
            }
            if (outcome == Outcome.OK && !missing.isEmpty()) {
                outcome = putMissing();
            }
            switch (outcome) {
                case OK -> {
                    if (state != State.REGISTERED) {
                        log.info("etcd answers again: lease {} is alive, the instance stays registered",
                                Long.toHexString(leaseId));
                        state = State.REGISTERED;
                    }
                }
                case BROKEN -> {
                    // Says nothing about the lease: keep it, and try again on a new stream
                    // at once, then every RETRY, so the instance is back within about a
                    // second of etcd answering.
                    boolean first = state == State.REGISTERED;
                    if (first) {
                        log.warn("etcd did not answer ({}); trying again every {} ms, keeping lease {}",
                                lastError, RETRY.toMillis(), Long.toHexString(leaseId));
                    }
                    state = State.RECONNECTING;
                    retryAt = System.nanoTime() + (first ? 0 : RETRY.toNanos());
                    keepAliveAt = Math.min(keepAliveAt, retryAt);
                }
                case LOST -> {
                    log.warn("lease {} expired or was revoked: registering again", Long.toHexString(leaseId));
                    state = State.RECONNECTING;
                    if (!reregister()) {
                        return;
                    }
                    keepAliveAt = System.nanoTime() + keepAliveInterval();
                }
            }
        }
    }

    /** One keepalive on a new stream, answered within a quarter of the TTL; TTL 0 is LOST. */
    private Outcome keepAlive() {
        try {
            client.getLeaseClient().keepAliveOnce(leaseId).get(answerTimeout().toMillis(), TimeUnit.MILLISECONDS);
            return Outcome.OK;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return Outcome.BROKEN;
        } catch (Exception e) {
            return failed(e.getCause() != null ? e.getCause() : e);
        }
    }

    private Outcome failed(Throwable error) {
        if (Etcd.leaseNotFound(error)) {
            return Outcome.LOST;
        }
        lastError = error instanceof java.util.concurrent.TimeoutException
                ? "no answer within " + answerTimeout().toMillis() + " ms"
                : error.toString();
        return Outcome.BROKEN;
    }

    /** Grants a new lease and puts every key again, until etcd answers; false when closing. */
    private boolean reregister() {
        while (!closing) {
            try {
                register();
                reregistrations.incrementAndGet();
                missing.clear();
                state = State.REGISTERED;
                return true;
            } catch (Exception e) {
                log.debug("registering again failed ({}), retrying", e.toString());
                try {
                    Thread.sleep(RETRY.toMillis());
                } catch (InterruptedException ie) {
                    return false;
                }
            }
        }
        return false;
    }

    private Outcome putMissing() {
        for (String key : List.copyOf(missing)) {
            try {
                put(key, entries.get(key), leaseId);
                missing.remove(key);
                log.warn("registered key {} was removed from outside: wrote it again", key);
                reregistrations.incrementAndGet();
            } catch (Exception e) {
                return failed(e);
            }
        }
        return Outcome.OK;
    }

    /** After a watch ended: which keys are gone, and a new watch from the revision read. */
    private Outcome rewatch() {
        closeWatchers();
        long revision = 0;
        try {
            for (String key : entries.keySet()) {
                GetResponse resp = Etcd.await(client.getKVClient()
                        .get(Etcd.bytes(key), GetOption.builder().withCountOnly(true).build()), answerTimeout());
                revision = Math.max(revision, resp.getHeader().getRevision());
                if (resp.getCount() == 0) {
                    missing.add(key);
                }
            }
        } catch (Exception e) {
            return failed(e);
        }
        rewatch = false;
        watch(revision + 1);
        return Outcome.OK;
    }

    /**
     * Watches each key for deletions from {@code revision}. jetcd resumes some
     * broken streams itself but ends the watcher on others (compaction, a halt
     * error); ending it and reading afresh in every case leaves no gap.
     */
    private void watch(long revision) {
        WatchOption option = WatchOption.builder().withRevision(revision).withNoPut(true).build();
        Watch.Listener listener = Watch.listener(this::onWatch, error -> {
            if (!closing && !rewatch) {
                log.debug("watch of the registered keys ended ({}), watching again", error.toString());
                rewatch = true;
                wakeups.offer(WAKE);
            }
        });
        synchronized (watchers) {
            for (String key : entries.keySet()) {
                watchers.add(client.getWatchClient().watch(Etcd.bytes(key), option, listener));
            }
        }
    }

    private void onWatch(WatchResponse response) {
        for (WatchEvent event : response.getEvents()) {
            String key = Etcd.string(event.getKeyValue().getKey());
            if (!closing && event.getEventType() == WatchEvent.EventType.DELETE && entries.containsKey(key)) {
                missing.add(key);
                wakeups.offer(WAKE);
            }
        }
    }

    private void closeWatchers() {
        synchronized (watchers) {
            watchers.forEach(Watch.Watcher::close);
            watchers.clear();
        }
    }

    private long keepAliveInterval() {
        double jitter = ThreadLocalRandom.current().nextDouble(0.8, 1.0);
        return (long) (TimeUnit.SECONDS.toNanos(ttlSecs) / 3 * jitter);
    }

    /**
     * How long any call of the session waits: a quarter of the TTL (0.5 to 2 s,
     * as common/registry), so a member that stalls costs one try, not the lease,
     * and the keepalives keep their pace.
     */
    private Duration answerTimeout() {
        long quarter = ttlSecs * 1000 / 4;
        return Duration.ofMillis(Math.max(500, Math.min(2000, quarter)));
    }
}
