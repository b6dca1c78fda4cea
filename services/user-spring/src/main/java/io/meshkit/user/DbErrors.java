package io.meshkit.user;

import io.grpc.Status;
import io.grpc.StatusException;
import java.sql.SQLException;
import java.sql.SQLNonTransientConnectionException;
import java.sql.SQLTransientConnectionException;

/**
 * The status a database error answers a caller with, as in the Rust services
 * ({@code common/db/src/error.rs}): a unique violation is ALREADY_EXISTS, connection
 * trouble UNAVAILABLE, anything else INTERNAL with a generic message. The real error
 * is logged, not sent.
 */
final class DbErrors {
    private DbErrors() {}

    static Status.Code code(SQLException e) {
        String state = e.getSQLState() == null ? "" : e.getSQLState();
        if (state.equals("23505")) {
            return Status.Code.ALREADY_EXISTS;
        }
        if (e instanceof SQLTransientConnectionException
                || e instanceof SQLNonTransientConnectionException
                // connection_exception; admin_shutdown, crash_shutdown, cannot_connect_now
                || state.startsWith("08")
                || state.equals("57P01")
                || state.equals("57P02")
                || state.equals("57P03")) {
            return Status.Code.UNAVAILABLE;
        }
        return Status.Code.INTERNAL;
    }

    static StatusException status(String what, SQLException e) {
        return switch (code(e)) {
            case ALREADY_EXISTS -> Status.ALREADY_EXISTS
                    .withDescription("a record with the same unique value already exists")
                    .asException();
            case UNAVAILABLE -> {
                UserStore.LOG.warn("database unavailable ({}): {}", what, describe(e));
                yield unavailable();
            }
            default -> {
                UserStore.LOG.error("database error ({}): {}", what, describe(e), e);
                yield Status.INTERNAL.withDescription("internal storage error").asException();
            }
        };
    }

    static StatusException unavailable() {
        return Status.UNAVAILABLE.withDescription("database unavailable, try again").asException();
    }

    private static String describe(SQLException e) {
        String text = "[" + e.getSQLState() + "] " + e.getMessage();
        return e.getCause() != null && e.getCause() != e ? text + " (" + e.getCause() + ")" : text;
    }
}
