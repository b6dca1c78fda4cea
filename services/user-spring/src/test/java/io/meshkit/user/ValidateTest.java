package io.meshkit.user;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.grpc.Status;
import io.grpc.StatusException;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import org.junit.jupiter.api.Test;

/** The rules of services/user/src/validate.rs and common/base/src/status.rs, with their messages. */
class ValidateTest {
    private static String refused(Executable call) {
        StatusException e = assertThrows(StatusException.class, call::run);
        assertEquals(Status.Code.INVALID_ARGUMENT, e.getStatus().getCode());
        return e.getStatus().getDescription();
    }

    @FunctionalInterface
    interface Executable {
        void run() throws Throwable;
    }

    @Test
    void names() throws Exception {
        assertEquals("Ada", Validate.name("  Ada "));
        assertEquals("name: must not be empty", refused(() -> Validate.name("")));
        assertEquals("name: must not be empty", refused(() -> Validate.name("   ")));
        assertEquals("name: must not be empty", refused(() -> Validate.name("\u3000\u0085\u00a0")));
        assertEquals("name: must not contain control characters", refused(() -> Validate.name("a\u0007b")));
        assertEquals("name: must be at most 200 characters", refused(() -> Validate.name("x".repeat(201))));
        assertEquals("é".repeat(200), Validate.name("é".repeat(200)), "counts characters, not bytes");
        assertEquals("😀".repeat(200), Validate.name("😀".repeat(200)), "counts code points, not UTF-16 units");
        // U+001F is a control character Rust does not trim (Java's strip would).
        assertEquals("name: must not contain control characters", refused(() -> Validate.name("Ada\u001f")));
    }

    @Test
    void emails() throws Exception {
        assertEquals("ada@example.com", Validate.email(" Ada@Example.COM "));
        assertEquals("a.b+tag@mail.example.co.uk", Validate.email("a.b+tag@mail.example.co.uk"));
        assertEquals("jürgen@bücher.de", Validate.email("Jürgen@Bücher.de"));
        for (String bad : List.of("ada", "ada@", "@example.com", "ada@example", "ada@@example.com",
                "a da@example.com", "ada@exa mple.com", "ada@.com", "ada@example..com", "ada@-x.com",
                "ada@x-.com", "a,da@example.com", "ada@exa_mple.com", "ada@example.com.")) {
            assertEquals("email: " + RustDebug.str(bad) + " is not an address like name@example.com",
                    refused(() -> Validate.email(bad)), bad);
        }
        assertEquals("email: must not be empty", refused(() -> Validate.email("")));
        assertEquals("email: must not be empty", refused(() -> Validate.email(" \t ")));
        assertEquals("email: \"ada\" is not an address like name@example.com", refused(() -> Validate.email("ada")));
        // The message quotes what was sent, untrimmed and not lower-cased.
        assertEquals("email: \" Ada\\n\" is not an address like name@example.com",
                refused(() -> Validate.email(" Ada\n")));
        String longLocal = "a".repeat(65) + "@example.com";
        assertTrue(refused(() -> Validate.email(longLocal)).endsWith("is not an address like name@example.com"));
        assertEquals("a".repeat(64) + "@example.com", Validate.email("a".repeat(64) + "@example.com"));
        String tooLong = "a@" + "b".repeat(250) + ".com";
        assertEquals("email: must be at most 254 characters", refused(() -> Validate.email(tooLong)));
        // 254 counts UTF-8 bytes, as Rust's str::len.
        String wide = "a@" + "é".repeat(125) + ".com";
        assertEquals("a@" + "é".repeat(124) + ".com", Validate.email("a@" + "é".repeat(124) + ".com"));
        assertEquals("email: must be at most 254 characters", refused(() -> Validate.email(wide)));
    }

    @Test
    void ids() throws Exception {
        String u = UuidV7.next().toString();
        assertEquals(u, Validate.id("id", u));
        String hyphenated = "0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b";
        assertEquals(hyphenated, Validate.id("id", hyphenated.toUpperCase()));
        assertEquals(hyphenated, Validate.id("id", hyphenated.replace("-", "")));
        assertEquals(hyphenated, Validate.id("id", "{" + hyphenated + "}"));
        assertEquals(hyphenated, Validate.id("id", "urn:uuid:" + hyphenated));
        assertEquals("id: must not be empty", refused(() -> Validate.id("id", "")));
        assertEquals("id: \"42\" is not a valid id", refused(() -> Validate.id("id", "42")));
        assertEquals("user_id: \"42\" is not a valid id", refused(() -> Validate.id("user_id", "42")));
        // The user-service's id rule does not trim.
        assertEquals("id: \" " + hyphenated + "\" is not a valid id", refused(() -> Validate.id("id", " " + hyphenated)));
        assertEquals("id: \" \" is not a valid id", refused(() -> Validate.id("id", " ")));
        assertNull(Validate.parseUuid("0190a3c4-5b6d-7e8f-9a0b_1c2d3e4f5a6b"));
        assertNull(Validate.parseUuid("0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6g"));
        assertNull(Validate.parseUuid("[" + hyphenated + "]"));
        assertNull(Validate.parseUuid("URN:UUID:" + hyphenated));
        assertNull(Validate.parseUuid("é".repeat(18)), "36 bytes, not ASCII");
        assertNull(Validate.parseUuid("{" + "é".repeat(18) + "}"));
    }

    @Test
    void pageSizes() throws Exception {
        assertEquals(50, Statuses.pageSize("page_size", 0, 50, 1000));
        assertEquals(7, Statuses.pageSize("page_size", 7, 50, 1000));
        assertEquals(1000, Statuses.pageSize("page_size", 1000, 50, 1000));
        assertEquals("page_size: must not be negative", refused(() -> Statuses.pageSize("page_size", -1, 50, 1000)));
        assertEquals("page_size: must be at most 1000", refused(() -> Statuses.pageSize("page_size", 1001, 50, 1000)));
    }

    @Test
    void aPageKeepsLimitRowsAndPointsPastTheLast() {
        Statuses.Page<Integer> page = Statuses.finishPage(List.of(1, 2, 3), 2, String::valueOf);
        assertEquals(List.of(1, 2), page.rows());
        assertEquals("2", page.nextPageToken());
        page = Statuses.finishPage(List.of(1, 2), 2, String::valueOf);
        assertEquals(List.of(1, 2), page.rows());
        assertEquals("", page.nextPageToken());
    }

    @Test
    void uuidV7IdsAreVersion7AndStrictlyIncrease() {
        List<String> ids = new ArrayList<>();
        for (int i = 0; i < 20_000; i++) {
            ids.add(UuidV7.next().toString());
        }
        for (int i = 1; i < ids.size(); i++) {
            assertTrue(ids.get(i - 1).compareTo(ids.get(i)) < 0, ids.get(i - 1) + " then " + ids.get(i));
        }
        UUID u = UUID.fromString(ids.get(0));
        assertEquals(7, u.version());
        assertEquals(2, u.variant());
        long ms = u.getMostSignificantBits() >>> 16;
        assertTrue(Math.abs(System.currentTimeMillis() - ms) < 60_000, "48-bit millisecond timestamp");
        // The same millisecond, or a clock that stepped back, still moves forward.
        UUID a = UuidV7.next(1_000);
        UUID b = UuidV7.next(1_000);
        assertTrue(a.toString().compareTo(b.toString()) < 0);
        assertFalse(a.equals(b));
    }

    @Test
    void timestampsSplitSecondsAndNanos() {
        assertEquals(1500, UserGrpcService.timestamp(1_500_000_250).getSeconds());
        assertEquals(250_000, UserGrpcService.timestamp(1_500_000_250).getNanos());
        assertEquals(-1, UserGrpcService.timestamp(-1).getSeconds());
        assertEquals(999_999_000, UserGrpcService.timestamp(-1).getNanos());
    }
}
