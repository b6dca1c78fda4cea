package io.meshkit.user;

import static org.junit.jupiter.api.Assertions.assertEquals;

import org.junit.jupiter.api.Test;

/** Expected strings are what Rust's format!("{:?}", s) prints. */
class RustDebugTest {
    @Test
    void plainTextIsQuoted() {
        assertEquals("\"ada\"", RustDebug.str("ada"));
        assertEquals("\"\"", RustDebug.str(""));
        assertEquals("\"it's\"", RustDebug.str("it's"), "single quotes stay");
        assertEquals("\"x@y.z\"", RustDebug.str("x@y.z"));
    }

    @Test
    void escapes() {
        assertEquals("\"a\\\"b\"", RustDebug.str("a\"b"));
        assertEquals("\"a\\\\b\"", RustDebug.str("a\\b"));
        assertEquals("\"\\n\\t\\r\\0\"", RustDebug.str("\n\t\r\0"));
        assertEquals("\"a\\u{7}b\"", RustDebug.str("a\u0007b"));
        assertEquals("\"\\u{1b}[0m\"", RustDebug.str("\u001b[0m"));
        assertEquals("\"\\u{7f}\"", RustDebug.str("\u007f"));
        assertEquals("\"\\u{85}\"", RustDebug.str("\u0085"));
    }

    @Test
    void unicode() {
        assertEquals("\"jürgen ñ 日本 😀\"", RustDebug.str("jürgen ñ 日本 😀"));
        // Not printable: spaces other than ' ', format characters, separators, private use.
        assertEquals("\"a\\u{a0}b\"", RustDebug.str("a\u00a0b"));
        assertEquals("\"\\u{200b}\\u{200d}\\u{feff}\"", RustDebug.str("\u200b\u200d\ufeff"));
        assertEquals("\"\\u{2028}\\u{3000}\"", RustDebug.str("\u2028\u3000"));
        assertEquals("\"\\u{e000}\"", RustDebug.str("\ue000"));
        // Grapheme-extending marks are escaped, even after a base character.
        assertEquals("\"e\\u{301}\"", RustDebug.str("e\u0301"));
        assertEquals("\"\\u{200c}\"", RustDebug.str("\u200c"));
        assertEquals("\"\\u{e0041}\"", RustDebug.str(new String(Character.toChars(0xE0041))));
    }
}
