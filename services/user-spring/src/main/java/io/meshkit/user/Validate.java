package io.meshkit.user;

import static io.meshkit.user.Statuses.invalidArgument;

import io.grpc.StatusException;
import java.nio.charset.StandardCharsets;
import java.util.Locale;
import java.util.UUID;

/**
 * The validation rules of {@code meshkit.user.v1} (user.proto), as the Rust
 * user-service applies them ({@code services/user/src/validate.rs}): the same
 * checks in the same order, with the same messages.
 */
public final class Validate {
    private Validate() {}

    public static final int MAX_NAME_CHARS = 200;
    /** In UTF-8 bytes, as Rust's {@code str::len}. */
    public static final int MAX_EMAIL_LEN = 254;
    /** In UTF-8 bytes. */
    public static final int MAX_LOCAL_LEN = 64;

    /** Trims and checks a user's name. */
    public static String name(String raw) throws StatusException {
        String name = trim(raw);
        if (name.isEmpty()) {
            throw invalidArgument("name", "must not be empty");
        }
        if (name.codePointCount(0, name.length()) > MAX_NAME_CHARS) {
            throw invalidArgument("name", "must be at most " + MAX_NAME_CHARS + " characters");
        }
        if (name.codePoints().anyMatch(Validate::isControl)) {
            throw invalidArgument("name", "must not contain control characters");
        }
        return name;
    }

    /** Trims, lower-cases and checks an email address: {@code local@domain.tld}. */
    public static String email(String raw) throws StatusException {
        String email = trim(raw).toLowerCase(Locale.ROOT);
        if (email.isEmpty()) {
            throw invalidArgument("email", "must not be empty");
        }
        if (utf8Len(email) > MAX_EMAIL_LEN) {
            throw invalidArgument("email", "must be at most " + MAX_EMAIL_LEN + " characters");
        }
        int at = email.indexOf('@');
        if (at < 0) {
            throw malformedEmail(raw);
        }
        String local = email.substring(0, at);
        String domain = email.substring(at + 1);
        // Rust's str::split keeps empty pieces, leading and trailing ones included.
        String[] labels = domain.split("\\.", -1);
        boolean badLabel = false;
        for (String label : labels) {
            if (label.isEmpty() || label.startsWith("-") || label.endsWith("-")) {
                badLabel = true;
                break;
            }
        }
        if (local.isEmpty()
                || utf8Len(local) > MAX_LOCAL_LEN
                || local.codePoints().anyMatch(Validate::badLocalChar)
                || labels.length < 2
                || badLabel
                || domain.codePoints().anyMatch(c -> !(isAlphanumeric(c) || c == '-' || c == '.'))) {
            throw malformedEmail(raw);
        }
        return email;
    }

    private static StatusException malformedEmail(String raw) {
        return invalidArgument("email", RustDebug.str(raw) + " is not an address like name@example.com");
    }

    private static boolean badLocalChar(int c) {
        return isWhitespace(c) || isControl(c) || "@,;<>()[]\\\"".indexOf(c) >= 0;
    }

    /** Checks an id argument (a UUID) and returns it normalised: lower-case, hyphenated. */
    public static String id(String field, String raw) throws StatusException {
        if (raw.isEmpty()) {
            throw invalidArgument(field, "must not be empty");
        }
        UUID uuid = parseUuid(raw);
        if (uuid == null) {
            throw invalidArgument(field, RustDebug.str(raw) + " is not a valid id");
        }
        return uuid.toString();
    }

    /**
     * The forms the Rust {@code uuid} crate's {@code Uuid::parse_str} accepts, told
     * apart by length in bytes: 32 hex digits; hyphenated 8-4-4-4-12; the
     * hyphenated form in braces; or after {@code urn:uuid:}. Hex digits in either
     * case. Null when {@code raw} is none of them.
     */
    static UUID parseUuid(String raw) {
        byte[] b = raw.getBytes(StandardCharsets.UTF_8);
        if (b.length != raw.length()) {
            return null; // not ASCII, so none of the forms
        }
        String hex;
        switch (b.length) {
            case 32 -> hex = raw;
            case 36 -> hex = dehyphenate(raw);
            case 38 -> hex = b[0] == '{' && b[37] == '}' ? dehyphenate(raw.substring(1, 37)) : null;
            case 45 -> hex = raw.startsWith("urn:uuid:") ? dehyphenate(raw.substring(9)) : null;
            default -> hex = null;
        }
        if (hex == null || hex.length() != 32) {
            return null;
        }
        long msb = 0;
        long lsb = 0;
        for (int i = 0; i < 32; i++) {
            int d = hexDigit(hex.charAt(i));
            if (d < 0) {
                return null;
            }
            if (i < 16) {
                msb = (msb << 4) | d;
            } else {
                lsb = (lsb << 4) | d;
            }
        }
        return new UUID(msb, lsb);
    }

    private static String dehyphenate(String s) {
        if (s.length() != 36 || s.charAt(8) != '-' || s.charAt(13) != '-' || s.charAt(18) != '-'
                || s.charAt(23) != '-') {
            return null;
        }
        return s.substring(0, 8) + s.substring(9, 13) + s.substring(14, 18) + s.substring(19, 23)
                + s.substring(24);
    }

    private static int hexDigit(char c) {
        if (c >= '0' && c <= '9') {
            return c - '0';
        }
        if (c >= 'a' && c <= 'f') {
            return c - 'a' + 10;
        }
        if (c >= 'A' && c <= 'F') {
            return c - 'A' + 10;
        }
        return -1;
    }

    // Rust's char classes, which differ from Java's Character.isWhitespace and String.strip.

    /** Rust's {@code str::trim}: strips Unicode White_Space from both ends. */
    static String trim(String s) {
        int start = 0;
        int end = s.length();
        while (start < end) {
            int c = s.codePointAt(start);
            if (!isWhitespace(c)) {
                break;
            }
            start += Character.charCount(c);
        }
        while (end > start) {
            int c = s.codePointBefore(end);
            if (!isWhitespace(c)) {
                break;
            }
            end -= Character.charCount(c);
        }
        return s.substring(start, end);
    }

    /** Rust's {@code char::is_whitespace}: the Unicode property White_Space. */
    static boolean isWhitespace(int c) {
        return (c >= 0x09 && c <= 0x0D)
                || c == 0x20
                || c == 0x85
                || c == 0xA0
                || c == 0x1680
                || (c >= 0x2000 && c <= 0x200A)
                || c == 0x2028
                || c == 0x2029
                || c == 0x202F
                || c == 0x205F
                || c == 0x3000;
    }

    /** Rust's {@code char::is_control}: general category Cc. */
    static boolean isControl(int c) {
        return Character.getType(c) == Character.CONTROL;
    }

    /** Rust's {@code char::is_alphanumeric}: Alphabetic, or a number (Nd, Nl, No). */
    static boolean isAlphanumeric(int c) {
        if (Character.isAlphabetic(c)) {
            return true;
        }
        int type = Character.getType(c);
        return type == Character.DECIMAL_DIGIT_NUMBER
                || type == Character.LETTER_NUMBER
                || type == Character.OTHER_NUMBER;
    }

    private static int utf8Len(String s) {
        return s.getBytes(StandardCharsets.UTF_8).length;
    }
}
