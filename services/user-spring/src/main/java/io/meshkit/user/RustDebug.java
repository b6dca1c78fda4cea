package io.meshkit.user;

/**
 * Rust's {@code Debug} formatting of a string ({@code format!("{s:?}")}), which the
 * Rust services put in their error messages: double quotes around the text, with
 * {@code \"}, {@code \\}, {@code \0}, {@code \t}, {@code \r}, {@code \n} and
 * <code>&#92;u{..}</code> (lower-case hex, no leading zeros) for what Rust does not print as
 * it is.
 *
 * <p>Rust escapes a character that is grapheme-extending (a combining mark) or not
 * printable: general category Cc, Cf, Cs, Co, Cn, Zl, Zp or Zs (except the space).
 * Java's character data stands in for Rust's tables, so a character assigned in a
 * Unicode version newer than the JDK's (unassigned here, printable in Rust) is the
 * one place the two can differ.
 */
public final class RustDebug {
    private RustDebug() {}

    /** {@code s} as Rust's {@code {s:?}} writes it. */
    public static String str(String s) {
        StringBuilder out = new StringBuilder(s.length() + 2).append('"');
        s.codePoints().forEach(c -> escape(c, out));
        return out.append('"').toString();
    }

    private static void escape(int c, StringBuilder out) {
        switch (c) {
            case 0 -> out.append("\\0");
            case '\t' -> out.append("\\t");
            case '\r' -> out.append("\\r");
            case '\n' -> out.append("\\n");
            case '\\' -> out.append("\\\\");
            case '"' -> out.append("\\\"");
            default -> {
                if (isGraphemeExtended(c) || !isPrintable(c)) {
                    out.append("\\u{").append(Integer.toHexString(c)).append('}');
                } else {
                    out.appendCodePoint(c);
                }
            }
        }
    }

    /** Rust's {@code core::unicode::printable::is_printable}. */
    static boolean isPrintable(int c) {
        if (c == ' ') {
            return true;
        }
        return switch (Character.getType(c)) {
            case Character.CONTROL, Character.FORMAT, Character.SURROGATE, Character.PRIVATE_USE,
                    Character.UNASSIGNED, Character.LINE_SEPARATOR, Character.PARAGRAPH_SEPARATOR,
                    Character.SPACE_SEPARATOR -> false;
            default -> true;
        };
    }

    /**
     * The Unicode property Grapheme_Extend (Rust's {@code char::is_grapheme_extended}):
     * the marks Mn and Me, and Other_Grapheme_Extend.
     */
    static boolean isGraphemeExtended(int c) {
        if (c <= 0x02ff) {
            return false;
        }
        int type = Character.getType(c);
        if (type == Character.NON_SPACING_MARK || type == Character.ENCLOSING_MARK) {
            return true;
        }
        for (int i = 0; i < OTHER_GRAPHEME_EXTEND.length; i += 2) {
            if (c >= OTHER_GRAPHEME_EXTEND[i] && c <= OTHER_GRAPHEME_EXTEND[i + 1]) {
                return true;
            }
        }
        return false;
    }

    /** Other_Grapheme_Extend (PropList.txt), as inclusive ranges. */
    private static final int[] OTHER_GRAPHEME_EXTEND = {
        0x09BE, 0x09BE, 0x09D7, 0x09D7, 0x0B3E, 0x0B3E, 0x0B57, 0x0B57, 0x0BBE, 0x0BBE,
        0x0BD7, 0x0BD7, 0x0CC2, 0x0CC2, 0x0CD5, 0x0CD6, 0x0D3E, 0x0D3E, 0x0D57, 0x0D57,
        0x0DCF, 0x0DCF, 0x0DDF, 0x0DDF, 0x1B35, 0x1B35, 0x200C, 0x200C, 0x302E, 0x302F,
        0xFF9E, 0xFF9F, 0x1133E, 0x1133E, 0x11357, 0x11357, 0x114B0, 0x114B0, 0x114BD, 0x114BD,
        0x115AF, 0x115AF, 0x11930, 0x11930, 0x1D165, 0x1D165, 0x1D16E, 0x1D172, 0xE0020, 0xE007F,
    };
}
