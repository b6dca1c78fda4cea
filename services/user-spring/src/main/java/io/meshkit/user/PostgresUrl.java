package io.meshkit.user;

import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;

/**
 * The database URL the Rust services take ({@code postgres://user:password@host:port/db?params}
 * or {@code postgresql://…}) as a JDBC URL, user and password. The host part (one
 * host, {@code host:port}, {@code [v6]:port}, or several separated by commas) and the
 * parameters ({@code sslmode=…} and the like) pass through; user and password are
 * percent-decoded.
 */
public record PostgresUrl(String jdbcUrl, String user, String password, String redacted) {
    static final String EXAMPLE = "postgres://user:password@host:5432/database";

    /** Converts {@code url}; an {@link IllegalArgumentException} saying why when it is not a PostgreSQL URL. */
    public static PostgresUrl parse(String url) {
        String rest;
        if (url.startsWith("postgres://")) {
            rest = url.substring("postgres://".length());
        } else if (url.startsWith("postgresql://")) {
            rest = url.substring("postgresql://".length());
        } else {
            // Only the scheme, so no password reaches a log.
            int sep = url.indexOf("://");
            String shown = sep >= 0 ? url.substring(0, sep + 3) + "…" : url;
            throw new IllegalArgumentException(
                    RustDebug.str(shown) + " is not a PostgreSQL URL like " + EXAMPLE
                            + " (this service keeps users in PostgreSQL only)");
        }
        String query = "";
        int q = rest.indexOf('?');
        if (q >= 0) {
            query = rest.substring(q + 1);
            rest = rest.substring(0, q);
        }
        String path = "";
        int slash = rest.indexOf('/');
        if (slash >= 0) {
            path = rest.substring(slash + 1);
            rest = rest.substring(0, slash);
        }
        String user = null;
        String password = null;
        int at = rest.lastIndexOf('@');
        if (at >= 0) {
            String userInfo = rest.substring(0, at);
            rest = rest.substring(at + 1);
            int colon = userInfo.indexOf(':');
            if (colon >= 0) {
                user = decode(userInfo.substring(0, colon));
                password = decode(userInfo.substring(colon + 1));
            } else {
                user = decode(userInfo);
            }
            if (user.isEmpty()) {
                user = null;
            }
        }
        String hosts = rest.isEmpty() ? "localhost" : rest;
        String jdbc = "jdbc:postgresql://" + hosts + "/" + path + (query.isEmpty() ? "" : "?" + query);
        String redacted = "postgres://" + (user == null ? "" : user + "@") + hosts + "/" + path;
        return new PostgresUrl(jdbc, user, password, redacted);
    }

    private static String decode(String s) {
        try {
            // URLDecoder reads '+' as a space, which a URL's user part does not mean.
            return URLDecoder.decode(s.replace("+", "%2B"), StandardCharsets.UTF_8);
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException("the user or password is not percent-encoded properly", e);
        }
    }

    @Override
    public String toString() {
        return redacted;
    }
}
