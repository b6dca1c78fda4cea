package io.meshkit.user;

import java.security.SecureRandom;
import java.util.UUID;

/**
 * UUIDv7 ids (RFC 9562): a 48-bit Unix timestamp in milliseconds, the version (7),
 * the variant bits, and random bits. The Rust user-service's ids are the same kind,
 * and paging relies on ids sorting in creation order: within one millisecond (or if
 * the clock steps back) an id continues from the last one by a random increment of
 * its random bits, so the ids of this process strictly increase.
 */
public final class UuidV7 {
    private static final SecureRandom RANDOM = new SecureRandom();
    private static final long RAND_B_MASK = (1L << 62) - 1;

    private static long lastMs = -1;
    private static int randA;
    private static long randB;

    private UuidV7() {}

    /** A new id. */
    public static UUID next() {
        return next(System.currentTimeMillis());
    }

    /** A new id at {@code nowMs} (or later, to stay after the last one). */
    static synchronized UUID next(long nowMs) {
        if (nowMs > lastMs) {
            lastMs = nowMs;
            randA = RANDOM.nextInt(1 << 12);
            randB = RANDOM.nextLong() & RAND_B_MASK;
        } else {
            randB += 1 + RANDOM.nextInt(1 << 30);
            if (randB > RAND_B_MASK) {
                randB &= RAND_B_MASK;
                randA++;
                if (randA >= 1 << 12) {
                    randA = 0;
                    lastMs++;
                }
            }
        }
        long msb = (lastMs & 0xFFFF_FFFF_FFFFL) << 16 | 0x7000L | randA;
        long lsb = 0x8000_0000_0000_0000L | randB;
        return new UUID(msb, lsb);
    }
}
