package io.meshkit.spring;

import java.util.OptionalLong;
import java.util.concurrent.TimeUnit;

import io.grpc.Context;
import io.grpc.Deadline;
import io.grpc.Status;

/**
 * The time left of the call being handled: the caller's {@code grpc-timeout},
 * which grpc-java keeps as the call Context's deadline. Handlers bound their
 * own work with it (a JDBC query timeout, a client call's deadline). It reads
 * the current gRPC Context: on a thread of its own a task needs
 * {@code Context.current().wrap(task)}.
 */
public final class Deadlines {

    private Deadlines() {
    }

    /** Milliseconds left (0 once passed), or empty when the call has no deadline. */
    public static OptionalLong remainingMillis() {
        Deadline deadline = Context.current().getDeadline();
        if (deadline == null) {
            return OptionalLong.empty();
        }
        return OptionalLong.of(Math.max(0, deadline.timeRemaining(TimeUnit.MILLISECONDS)));
    }

    /**
     * For {@code Statement.setQueryTimeout}: the seconds left rounded up (at
     * least 1, as 0 would mean no limit), or {@code fallbackSeconds} when the
     * call has no deadline. Throws DEADLINE_EXCEEDED when it has passed.
     */
    public static int queryTimeoutSeconds(int fallbackSeconds) {
        OptionalLong left = remainingMillis();
        if (left.isEmpty()) {
            return fallbackSeconds;
        }
        check();
        return (int) Math.max(1, Math.min(Integer.MAX_VALUE, (left.getAsLong() + 999) / 1000));
    }

    /** Throws DEADLINE_EXCEEDED (a StatusRuntimeException) when the call's deadline has passed. */
    public static void check() {
        Deadline deadline = Context.current().getDeadline();
        if (deadline != null && deadline.isExpired()) {
            throw Status.DEADLINE_EXCEEDED.withDescription("the deadline passed").asRuntimeException();
        }
    }
}
