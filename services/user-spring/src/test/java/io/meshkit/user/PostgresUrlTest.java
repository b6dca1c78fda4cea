package io.meshkit.user;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.grpc.Status;
import java.sql.SQLException;
import java.sql.SQLTransientConnectionException;
import org.junit.jupiter.api.Test;

class PostgresUrlTest {
    @Test
    void theRustServicesUrlsBecomeJdbcOnes() {
        PostgresUrl pg = PostgresUrl.parse("postgres://postgres@127.0.0.1:5433/postgres");
        assertEquals("jdbc:postgresql://127.0.0.1:5433/postgres", pg.jdbcUrl());
        assertEquals("postgres", pg.user());
        assertNull(pg.password());

        pg = PostgresUrl.parse("postgresql://app:p%40ss+w%3Ard@db.example.com/shop?sslmode=require");
        assertEquals("jdbc:postgresql://db.example.com/shop?sslmode=require", pg.jdbcUrl());
        assertEquals("app", pg.user());
        assertEquals("p@ss+w:rd", pg.password());
        assertFalse(pg.toString().contains("p@ss"), "no password in what is logged");

        pg = PostgresUrl.parse("postgres://[::1]:5432/db");
        assertEquals("jdbc:postgresql://[::1]:5432/db", pg.jdbcUrl());
        assertNull(pg.user());

        pg = PostgresUrl.parse("postgres://u:x@h1:5432,h2:5433/db");
        assertEquals("jdbc:postgresql://h1:5432,h2:5433/db", pg.jdbcUrl());
    }

    @Test
    void otherUrlsAreRefusedWithoutShowingThePassword() {
        var e = assertThrows(IllegalArgumentException.class, () -> PostgresUrl.parse("mysql://u:secret@h/db"));
        assertTrue(e.getMessage().startsWith("\"mysql://…\" is not a PostgreSQL URL"), e.getMessage());
        assertFalse(e.getMessage().contains("secret"));
        e = assertThrows(IllegalArgumentException.class, () -> PostgresUrl.parse("sqlite://user.db?mode=rwc"));
        assertTrue(e.getMessage().contains("PostgreSQL"));
    }

    @Test
    void databaseErrorsMapAsInTheRustServices() {
        assertEquals(Status.Code.ALREADY_EXISTS, DbErrors.code(new SQLException("dup", "23505")));
        assertEquals(Status.Code.UNAVAILABLE, DbErrors.code(new SQLException("io", "08006")));
        assertEquals(Status.Code.UNAVAILABLE, DbErrors.code(new SQLException("shutdown", "57P01")));
        assertEquals(Status.Code.UNAVAILABLE, DbErrors.code(new SQLTransientConnectionException("pool timed out")));
        assertEquals(Status.Code.INTERNAL, DbErrors.code(new SQLException("no such column", "42703")));
        assertEquals(Status.Code.INTERNAL, DbErrors.code(new SQLException("no state")));
        assertEquals("internal storage error",
                DbErrors.status("test", new SQLException("x", "42P01")).getStatus().getDescription());
        assertEquals("database unavailable, try again",
                DbErrors.status("test", new SQLException("x", "08001")).getStatus().getDescription());
    }
}
