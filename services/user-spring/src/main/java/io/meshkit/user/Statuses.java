package io.meshkit.user;

import io.grpc.Status;
import io.grpc.StatusException;
import java.util.List;
import java.util.function.Function;

/**
 * The status helpers of the Rust services ({@code common/base/src/status.rs}):
 * failures a caller can act on, with the same messages.
 */
public final class Statuses {
    private Statuses() {}

    /** INVALID_ARGUMENT naming the field: {@code "email: must not be empty"}. */
    public static StatusException invalidArgument(String field, String problem) {
        return Status.INVALID_ARGUMENT.withDescription(field + ": " + problem).asException();
    }

    /** A page size: 0 means {@code dflt}; negative or above {@code max} is refused. */
    public static int pageSize(String field, int requested, int dflt, int max) throws StatusException {
        if (requested == 0) {
            return dflt;
        }
        if (requested < 0) {
            throw invalidArgument(field, "must not be negative");
        }
        if (requested > max) {
            throw invalidArgument(field, "must be at most " + max);
        }
        return requested;
    }

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
