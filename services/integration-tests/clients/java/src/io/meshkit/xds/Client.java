package io.meshkit.xds;

import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ConnectivityState;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ForwardingClientCall.SimpleForwardingClientCall;
import io.grpc.ForwardingClientCallListener.SimpleForwardingClientCallListener;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.stub.StreamObserver;
import io.meshkit.user.v1.GetUserRequest;
import io.meshkit.user.v1.User;
import io.meshkit.user.v1.UserServiceGrpc;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.Locale;
import java.util.Map;
import java.util.Objects;
import java.util.TreeMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.Semaphore;
import java.util.concurrent.TimeUnit;

/**
 * grpc-java's xDS client of meshkit for the xDS integration tests: it resolves an xds:/// target
 * through the management server named by $GRPC_XDS_BOOTSTRAP and calls UserService/GetUser open
 * loop at a fixed rate, printing one JSON line per call and a summary. Its flags and output are
 * those of services/integration-tests/clients/go (grpc-go), so a test can drive either.
 *
 * <pre>java -cp CLASSPATH io.meshkit.xds.Client --user-id ID [--target xds:///meshkit.user.v1.UserService]
 *     [--rate 100] [--seconds 10 (0: until stdin ends)] [--deadline-ms 2000]
 *     [--ready-timeout-ms 0 (0: call at once)]</pre>
 *
 * <p>With --ready-timeout-ms the calls start once the channel is READY (xDS resolved and one
 * backend connected), so a cold JVM is not counted as failed calls; the wait is printed as
 * {"event":"ready","ms":…}.
 */
public final class Client {
    private static final int MAX_IN_FLIGHT = 256;
    private static final Metadata.Key<String> INSTANCE =
            Metadata.Key.of("x-meshkit-instance", Metadata.ASCII_STRING_MARSHALLER);

    private final PrintStream out;
    private int calls;
    private int ok;
    private final Map<String, Integer> byInstance = new TreeMap<>();
    private final Map<String, Integer> byCode = new TreeMap<>();

    private Client(PrintStream out) {
        this.out = out;
    }

    /** Captures one call's x-meshkit-instance: from its headers, or the trailers of a trailers-only answer. */
    private static final class InstanceCapture implements ClientInterceptor {
        volatile String instance = "";

        @Override
        public <Q, R> ClientCall<Q, R> interceptCall(MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
            return new SimpleForwardingClientCall<>(next.newCall(method, options)) {
                @Override
                public void start(Listener<R> listener, Metadata headers) {
                    super.start(new SimpleForwardingClientCallListener<>(listener) {
                        @Override
                        public void onHeaders(Metadata received) {
                            record(received);
                            super.onHeaders(received);
                        }

                        @Override
                        public void onClose(Status status, Metadata trailers) {
                            record(trailers); // a trailers-only answer's headers are its trailers
                            super.onClose(status, trailers);
                        }
                    }, headers);
                }
            };
        }

        private void record(Metadata metadata) {
            instance = instance.isEmpty() ? Objects.toString(metadata.get(INSTANCE), "") : instance;
        }
    }

    /** Writes a whole line to stdout; one at a time. */
    private synchronized void emit(String line) {
        out.print(line + "\n");
        out.flush();
    }

    private synchronized void call(long startedNanos, long latencyNanos, String code, String instance, String msg) {
        calls++;
        if (code.equals("OK")) {
            ok++;
        }
        if (!instance.isEmpty()) {
            byInstance.merge(instance, 1, Integer::sum);
        }
        byCode.merge(code, 1, Integer::sum);
        emit(String.format(Locale.ROOT, "{\"t\":%.1f,\"ms\":%.3f,\"code\":%s,\"instance\":%s,\"msg\":%s}",
                startedNanos / 1e6, latencyNanos / 1e6, quote(code), quote(instance), quote(msg)));
    }

    private synchronized void end() {
        emit(String.format(Locale.ROOT, "{\"event\":\"end\",\"calls\":%d,\"ok\":%d,\"by_instance\":%s,\"by_code\":%s}",
                calls, ok, object(byInstance), object(byCode)));
    }

    private static String object(Map<String, Integer> counts) {
        StringBuilder b = new StringBuilder("{");
        counts.forEach((k, v) -> b.append(b.length() > 1 ? "," : "").append(quote(k)).append(':').append(v));
        return b.append('}').toString();
    }

    /** A JSON string, escaped as Go's encoding/json (without HTML escaping) escapes it. */
    private static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            int escape = "\"\\\b\f\n\r\t".indexOf(c);
            if (escape >= 0) {
                b.append('\\').append("\"\\bfnrt".charAt(escape));
            } else if (c < 0x20 || c == '\u2028' || c == '\u2029') {
                b.append(String.format("\\u%04x", (int) c));
            } else {
                b.append(c);
            }
        }
        return b.append('"').toString();
    }

    private static void fail(String message) {
        System.err.println("io.meshkit.xds.Client: " + message);
        System.exit(2);
    }

    private static void check(boolean ok, String message) {
        if (!ok) {
            fail(message);
        }
    }

    /** Asks the channel to connect and waits up to {@code timeoutMs} for READY; returns the last state seen. */
    private static ConnectivityState waitReady(ManagedChannel channel, long timeoutMs) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(timeoutMs);
        ConnectivityState state = channel.getState(true);
        while (state != ConnectivityState.READY) {
            CountDownLatch changed = new CountDownLatch(1);
            channel.notifyWhenStateChanged(state, changed::countDown);
            long left = deadline - System.nanoTime();
            if (left <= 0 || !changed.await(left, TimeUnit.NANOSECONDS)) {
                return channel.getState(false);
            }
            state = channel.getState(true); // after TRANSIENT_FAILURE or IDLE, connect again
        }
        return state;
    }

    public static void main(String[] args) throws InterruptedException {
        Map<String, String> flags = new HashMap<>(Map.of("target", "xds:///meshkit.user.v1.UserService",
                "user-id", "", "rate", "100", "seconds", "10", "deadline-ms", "2000",
                "ready-timeout-ms", "0"));
        for (int i = 0; i < args.length; i++) { // --name value, --name=value, or one dash
            String arg = args[i].replaceFirst("^--?", "");
            String name = arg.contains("=") ? arg.substring(0, arg.indexOf('=')) : arg;
            if (arg.equals(args[i]) || !flags.containsKey(name)) {
                fail("unknown argument " + args[i]);
            } else if (arg.contains("=")) {
                flags.put(name, arg.substring(arg.indexOf('=') + 1));
            } else if (i + 1 < args.length) {
                flags.put(name, args[++i]);
            } else {
                fail("flag needs an argument: " + args[i]);
            }
        }
        String target = flags.get("target"), userId = flags.get("user-id");
        double rate = 0, seconds = 0;
        long deadlineMs = 0, readyMs = 0;
        try {
            rate = Double.parseDouble(flags.get("rate"));
            seconds = Double.parseDouble(flags.get("seconds"));
            deadlineMs = Long.parseLong(flags.get("deadline-ms"));
            readyMs = Long.parseLong(flags.get("ready-timeout-ms"));
        } catch (NumberFormatException e) {
            fail("not a number: " + e.getMessage());
        }
        check(!userId.isEmpty(), "--user-id is required");
        check(rate > 0, "--rate must be positive");
        check(seconds >= 0, "--seconds must not be negative");
        check(deadlineMs > 0, "--deadline-ms must be positive");
        check(readyMs >= 0, "--ready-timeout-ms must not be negative");
        // stdout carries the JSON lines only: whatever else writes to System.out (a logger's
        // default console, say) goes to stderr.
        Client client = new Client(new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8));
        System.setOut(System.err);
        ManagedChannel channel = null;
        try {
            channel = Grpc.newChannelBuilder(target, InsecureChannelCredentials.create()).build();
        } catch (RuntimeException e) {
            fail("cannot create a channel to " + target + ": " + e);
        }
        UserServiceGrpc.UserServiceStub stub = UserServiceGrpc.newStub(channel);
        GetUserRequest request = GetUserRequest.newBuilder().setId(userId).build();

        CountDownLatch stdinEOF = new CountDownLatch(1); // with --seconds 0, counted down when stdin ends
        if (seconds == 0) {
            Thread reader = new Thread(() -> {
                try {
                    System.in.transferTo(OutputStream.nullOutputStream());
                } catch (IOException e) { // as good as EOF
                }
                stdinEOF.countDown();
            });
            reader.setDaemon(true);
            reader.start();
        }
        if (readyMs > 0) {
            long waited = System.nanoTime();
            ConnectivityState state = waitReady(channel, readyMs);
            check(state == ConnectivityState.READY,
                    "the channel to " + target + " is not READY after " + readyMs + " ms (last state " + state + ")");
            client.emit(String.format(Locale.ROOT, "{\"event\":\"ready\",\"ms\":%.1f}", (System.nanoTime() - waited) / 1e6));
        }
        client.emit("{\"event\":\"start\"}");
        long start = System.nanoTime();
        Semaphore slots = new Semaphore(MAX_IN_FLIGHT);
        // Open loop: call i starts at i/rate seconds, however many are still running.
        for (long i = 0; ; i++) {
            long at = (long) (i * 1e9 / rate);
            if (seconds > 0 && at >= (long) (seconds * 1e9)
                    || stdinEOF.await(Math.max(0, start + at - System.nanoTime()), TimeUnit.NANOSECONDS)) {
                break;
            }
            long called = System.nanoTime();
            if (!slots.tryAcquire()) {
                client.call(called - start, 0, "SKIPPED", "", MAX_IN_FLIGHT + " calls in flight");
                continue;
            }
            InstanceCapture capture = new InstanceCapture();
            stub.withInterceptors(capture).withDeadlineAfter(deadlineMs, TimeUnit.MILLISECONDS)
                    .getUser(request, new StreamObserver<User>() {
                        @Override
                        public void onNext(User user) {}

                        @Override
                        public void onError(Throwable t) {
                            done(Status.fromThrowable(t));
                        }

                        @Override
                        public void onCompleted() {
                            done(Status.OK);
                        }

                        private void done(Status status) {
                            client.call(called - start, System.nanoTime() - called, status.getCode().name(),
                                    capture.instance, status.isOk() ? "" : Objects.toString(status.getDescription(), ""));
                            slots.release();
                        }
                    });
        }
        slots.acquireUninterruptibly(MAX_IN_FLIGHT); // every call has finished
        client.end();
        channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        System.exit(0);
    }
}
