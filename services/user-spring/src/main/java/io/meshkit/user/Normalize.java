package io.meshkit.user;

import java.util.Locale;

/**
 * What the service makes of a request that passed user.proto's protovalidate rules
 * (checked before any handler by the meshkit starter's ValidationInterceptor), as
 * the Rust user-service stores it: the name without surrounding spaces,
 * the email lower-cased, ids (UUIDs by then) lower-case.
 */
public final class Normalize {
    private Normalize() {}

    /**
     * The name as stored: without surrounding spaces. The rules allow no control
     * characters, so spaces are all there is to trim, as the Rust service trims.
     */
    public static String name(String valid) {
        int start = 0;
        int end = valid.length();
        while (start < end && valid.charAt(start) == ' ') {
            start++;
        }
        while (end > start && valid.charAt(end - 1) == ' ') {
            end--;
        }
        return valid.substring(start, end);
    }

    /** The email as stored: lower-cased (the rules allow ASCII addresses only). */
    public static String email(String valid) {
        return valid.toLowerCase(Locale.ROOT);
    }

    /** An id, hyphenated 8-4-4-4-12 hex by the rules ({@code string.uuid}), in lower case as stored. */
    public static String id(String valid) {
        return valid.toLowerCase(Locale.ROOT);
    }
}
