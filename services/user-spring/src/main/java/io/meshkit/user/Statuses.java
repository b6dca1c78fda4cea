package io.meshkit.user;

import java.util.List;
import java.util.function.Function;

/**
 * Keyset paging as the Rust services page ({@code common/base/src/status.rs}).
 * Invalid arguments are refused before any handler, by the meshkit starter's
 * ValidationInterceptor from the protos' protovalidate rules.
 */
public final class Statuses {
    private Statuses() {}

    /** One page of rows and the token of the next (empty on the last page). */
    public record Page<T>(List<T> rows, String nextPageToken) {}

    /**
     * Ends a keyset page: {@code rows} were read with a limit of {@code limit + 1};
     * the extra row, if any, is dropped and the last kept row's key becomes the next
     * page token.
     */
    public static <T> Page<T> finishPage(List<T> rows, int limit, Function<T, String> key) {
        if (rows.size() > limit) {
            List<T> kept = rows.subList(0, limit);
            String token = kept.isEmpty() ? "" : key.apply(kept.get(kept.size() - 1));
            return new Page<>(List.copyOf(kept), token);
        }
        return new Page<>(List.copyOf(rows), "");
    }
}
