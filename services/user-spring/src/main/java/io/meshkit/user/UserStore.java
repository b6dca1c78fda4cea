package io.meshkit.user;

import io.grpc.Context;
import io.grpc.Deadline;
import io.grpc.Status;
import io.grpc.StatusException;
import java.sql.Connection;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.TimeUnit;
import javax.sql.DataSource;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.InitializingBean;
import org.springframework.stereotype.Component;

/**
 * The {@code users} table of the Rust user-service (services/user/src/entity.rs),
 * over plain JDBC. The Rust service's migrations create it; this service creates no
 * schema and checks at start that the table is there.
 *
 * <p>Each statement is bounded by what is left of the gRPC call's deadline.
 */
@Component
public class UserStore implements InitializingBean {
    static final Logger LOG = LoggerFactory.getLogger("io.meshkit.user");

    static final String TABLE = "users";
    private static final String COLUMNS = "id, name, email, create_time_us";

    /** One row: {@code id} a UUIDv7, {@code email} lower-cased and unique, micros since the epoch. */
    public record Row(String id, String name, String email, long createTimeUs) {}

    private final DataSource dataSource;

    public UserStore(DataSource dataSource) {
        this.dataSource = dataSource;
    }

    /** Fails start-up, naming the table, when it is missing or lacks a column. */
    @Override
    public void afterPropertiesSet() {
        try (Connection c = dataSource.getConnection()) {
            try (PreparedStatement ps = c.prepareStatement("SELECT to_regclass(?)")) {
                ps.setString(1, TABLE);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (rs.getString(1) == null) {
                        throw new StartupCheckException(
                                "table \"" + TABLE + "\" does not exist in the database "
                                        + c.getMetaData().getURL() + " (schema " + c.getSchema() + ").",
                                "The Rust user-service's migrations create it: start user-service once"
                                        + " with the same MESHKIT_DATABASE_URL, then this service.");
                    }
                }
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT " + COLUMNS + " FROM " + TABLE + " LIMIT 0")) {
                ps.executeQuery().close();
            } catch (SQLException e) {
                throw new StartupCheckException(
                        "table \"" + TABLE + "\" is not the user-service's: " + e.getMessage(),
                        "Point MESHKIT_DATABASE_URL at the Rust user-service's database.", e);
            }
            LOG.info("table \"{}\" found", TABLE);
        } catch (SQLException e) {
            throw new StartupCheckException(
                    "cannot check table \"" + TABLE + "\": the database cannot be reached: " + e.getMessage(),
                    "Check MESHKIT_DATABASE_URL and that PostgreSQL is running.", e);
        }
    }

    /** Inserts a row; ALREADY_EXISTS when the email (or id) is taken. */
    public void insert(Row row) throws StatusException {
        run("insert user", (c, timeout) -> {
            try (PreparedStatement ps = c.prepareStatement(
                    "INSERT INTO " + TABLE + " (" + COLUMNS + ") VALUES (?, ?, ?, ?)")) {
                ps.setQueryTimeout(timeout);
                ps.setString(1, row.id());
                ps.setString(2, row.name());
                ps.setString(3, row.email());
                ps.setLong(4, row.createTimeUs());
                ps.executeUpdate();
                return null;
            }
        });
    }

    /** The row with {@code id} (normalised), if any. */
    public Optional<Row> find(String id) throws StatusException {
        return run("get user", (c, timeout) -> {
            try (PreparedStatement ps = c.prepareStatement("SELECT " + COLUMNS + " FROM " + TABLE + " WHERE id = ?")) {
                ps.setQueryTimeout(timeout);
                ps.setString(1, id);
                try (ResultSet rs = ps.executeQuery()) {
                    return rs.next() ? Optional.of(row(rs)) : Optional.<Row>empty();
                }
            }
        });
    }

    /** Up to {@code limit} rows in id order, after {@code after} when not null. */
    public List<Row> list(String after, int limit) throws StatusException {
        return run("list users", (c, timeout) -> {
            String sql = "SELECT " + COLUMNS + " FROM " + TABLE
                    + (after == null ? "" : " WHERE id > ?") + " ORDER BY id LIMIT ?";
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                ps.setQueryTimeout(timeout);
                int i = 1;
                if (after != null) {
                    ps.setString(i++, after);
                }
                ps.setInt(i, limit);
                List<Row> rows = new ArrayList<>();
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        rows.add(row(rs));
                    }
                }
                return rows;
            }
        });
    }

    private static Row row(ResultSet rs) throws SQLException {
        return new Row(rs.getString(1), rs.getString(2), rs.getString(3), rs.getLong(4));
    }

    @FunctionalInterface
    private interface Work<T> {
        /** {@code timeout}: seconds for {@link java.sql.Statement#setQueryTimeout} (0 for none). */
        T run(Connection c, int timeout) throws SQLException;
    }

    private <T> T run(String what, Work<T> work) throws StatusException {
        Deadline deadline = Context.current().getDeadline();
        int timeout = 0;
        if (deadline != null) {
            long ms = deadline.timeRemaining(TimeUnit.MILLISECONDS);
            if (ms <= 0) {
                throw deadlineExceeded();
            }
            timeout = (int) Math.min(Integer.MAX_VALUE, Math.max(1, (ms + 999) / 1000));
        }
        try (Connection c = dataSource.getConnection()) {
            return work.run(c, timeout);
        } catch (SQLException e) {
            if (deadline != null && deadline.isExpired() && "57014".equals(e.getSQLState())) {
                // query_canceled by the statement timeout set from the deadline
                throw deadlineExceeded();
            }
            if (dataSource instanceof com.zaxxer.hikari.HikariDataSource h && h.isClosed()) {
                throw DbErrors.unavailable(); // shutting down
            }
            throw DbErrors.status(what, e);
        }
    }

    private static StatusException deadlineExceeded() {
        return Status.DEADLINE_EXCEEDED.withDescription("deadline exceeded").asException();
    }
}
