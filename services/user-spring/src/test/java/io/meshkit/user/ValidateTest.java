package io.meshkit.user;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.rpc.BadRequest;
import io.grpc.ManagedChannel;
import io.grpc.Server;
import io.grpc.ServerInterceptors;
import io.grpc.Status;
import io.grpc.StatusException;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.NettyServerBuilder;
import io.grpc.protobuf.StatusProto;
import io.meshkit.spring.ValidationInterceptor;
import io.meshkit.user.v1.CreateUserRequest;
import io.meshkit.user.v1.GetUserRequest;
import io.meshkit.user.v1.ListUsersRequest;
import io.meshkit.user.v1.ListUsersResponse;
import io.meshkit.user.v1.User;
import io.meshkit.user.v1.UserServiceGrpc;
import java.net.InetSocketAddress;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.TreeMap;
import java.util.UUID;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestInstance;

/**
 * The UserService's arguments: user.proto's protovalidate rules, checked by the meshkit
 * starter's ValidationInterceptor before the handler (the Rust servers' INVALID_ARGUMENT
 * contract: {@code field: message [rule_id]} joined by "; ", and a google.rpc.BadRequest
 * detail), then the service's own normalisation. The handler runs on an in-memory store.
 */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class ValidateTest {

    /** The users table in memory, by id; counts the statements that reached it. */
    static final class MemoryStore extends UserStore {
        final Map<String, Row> rows = new TreeMap<>();
        int calls;

        MemoryStore() {
            super(null);
        }

        @Override
        public synchronized void insert(Row row) throws StatusException {
            calls++;
            if (rows.values().stream().anyMatch(r -> r.email().equals(row.email()))) {
                throw Status.ALREADY_EXISTS.asException();
            }
            rows.put(row.id(), row);
        }

        @Override
        public synchronized Optional<Row> find(String id) {
            calls++;
            return Optional.ofNullable(rows.get(id));
        }

        @Override
        public synchronized List<Row> list(String after, int limit) {
            calls++;
            return rows.values().stream().filter(r -> after == null || r.id().compareTo(after) > 0).limit(limit).toList();
        }
    }

    private final MemoryStore store = new MemoryStore();
    private Server server;
    private ManagedChannel channel;
    private UserServiceGrpc.UserServiceBlockingStub users;

    @BeforeAll
    void start() throws Exception {
        server = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0))
                .addService(ServerInterceptors.intercept(new UserGrpcService(store), new ValidationInterceptor()))
                .build()
                .start();
        channel = NettyChannelBuilder.forAddress("127.0.0.1", server.getPort()).usePlaintext().build();
        users = UserServiceGrpc.newBlockingStub(channel);
    }

    @AfterAll
    void stop() throws Exception {
        channel.shutdownNow();
        server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }

    @BeforeEach
    void empty() {
        synchronized (store) {
            store.rows.clear();
            store.calls = 0;
        }
    }

    /** A violation as a caller reads it from the BadRequest detail. */
    record Violation(String field, String description, String reason) {}

    /**
     * Asserts the refusal contract: INVALID_ARGUMENT whose message is the BadRequest's
     * violations as {@code field: description [reason]} joined by "; ", the same message
     * in the google.rpc.Status (code 3), violations of the fields and rule ids
     * {@code fieldsAndReasons} (field, reason, field, reason, …) in that order, and no
     * handler run. Returns the violations.
     */
    private List<Violation> refused(Runnable call, String... fieldsAndReasons) throws Exception {
        StatusRuntimeException e = assertThrows(StatusRuntimeException.class, call::run);
        assertEquals(Status.Code.INVALID_ARGUMENT, e.getStatus().getCode());
        com.google.rpc.Status status = StatusProto.fromThrowable(e);
        assertNotNull(status, "grpc-status-details-bin");
        assertEquals(3, status.getCode());
        assertEquals(e.getStatus().getDescription(), status.getMessage());
        assertEquals(1, status.getDetailsCount());
        List<Violation> found = new ArrayList<>();
        for (BadRequest.FieldViolation v : status.getDetails(0).unpack(BadRequest.class).getFieldViolationsList()) {
            found.add(new Violation(v.getField(), v.getDescription(), v.getReason()));
        }
        List<String> want = new ArrayList<>();
        for (int i = 0; i < fieldsAndReasons.length; i += 2) {
            want.add(fieldsAndReasons[i] + " [" + fieldsAndReasons[i + 1] + "]");
        }
        assertEquals(want, found.stream().map(v -> v.field() + " [" + v.reason() + "]").toList());
        assertEquals(String.join("; ", found.stream()
                        .map(v -> (v.field().isEmpty() ? "" : v.field() + ": ") + v.description() + " [" + v.reason() + "]")
                        .toList()),
                e.getStatus().getDescription());
        assertTrue(e.getStatus().getDescription().startsWith(fieldsAndReasons[0] + ": "), "the message names the field first");
        synchronized (store) {
            assertEquals(0, store.calls, "a refused request reaches no handler");
        }
        return found;
    }

    /** The message of a refusal with one violation. */
    private static String message(Runnable call) {
        return assertThrows(StatusRuntimeException.class, call::run).getStatus().getDescription();
    }

    private static CreateUserRequest create(String name, String email) {
        return CreateUserRequest.newBuilder().setName(name).setEmail(email).build();
    }

    @Test
    void createUserRefusesWhatUserProtoRulesOut() throws Exception {
        assertEquals(List.of(new Violation("name", "value is required", "required")),
                refused(() -> users.createUser(create("", "ada@example.com")), "name", "required"));
        assertEquals("name: value is required [required]", message(() -> users.createUser(create("", "ada@example.com"))));
        refused(() -> users.createUser(create("x".repeat(201), "ada@example.com")), "name", "string.max_len");
        assertEquals("name: must be at most 200 characters [string.max_len]",
                message(() -> users.createUser(create("x".repeat(201), "ada@example.com"))));
        // Blank, or with control characters: user.proto's pattern.
        refused(() -> users.createUser(create("   ", "ada@example.com")), "name", "string.pattern");
        refused(() -> users.createUser(create("a\u0007b", "ada@example.com")), "name", "string.pattern");
        refused(() -> users.createUser(create("Ada\u001f", "ada@example.com")), "name", "string.pattern");

        refused(() -> users.createUser(create("Ada", "ada")), "email", "string.email");
        assertEquals("email: must be a valid email address [string.email]", message(() -> users.createUser(create("Ada", "ada"))));
        for (String bad : List.of("@example.com", "ada@@example.com", "a da@example.com", "ada@exa mple.com",
                " ada@example.com")) {
            refused(() -> users.createUser(create("Ada", bad)), "email", "string.email");
        }
        // Two rules of one field broken: both, in validate.proto's order of the rules.
        refused(() -> users.createUser(create("Ada", "ada@")), "email", "string.pattern", "email", "string.email");
        // A domain with a dot: user.proto's pattern.
        refused(() -> users.createUser(create("Ada", "ada@example")), "email", "string.pattern");
        // Every violation, in the order of the fields.
        assertEquals(List.of(
                        new Violation("name", "value is required", "required"),
                        new Violation("email", "value is empty, which is not a valid email address", "string.email_empty")),
                refused(() -> users.createUser(create("", "")), "name", "required", "email", "string.email_empty"));
        assertEquals("name: value is required [required]; "
                        + "email: value is empty, which is not a valid email address [string.email_empty]",
                message(() -> users.createUser(create("", ""))));
    }

    @Test
    void createUserStoresTheNameTrimmedAndTheEmailLowerCased() {
        User user = users.createUser(create("  Ada ", "Ada@Example.COM"));
        // The rules' classes are ASCII: U+3000 and U+00A0 are characters like any other.
        assertEquals("\u3000\u00a0", users.createUser(create(" \u3000\u00a0 ", "wide@example.com")).getName());
        assertEquals("Ada", user.getName());
        assertEquals("ada@example.com", user.getEmail());
        assertEquals(7, UUID.fromString(user.getId()).version());
        assertEquals("é".repeat(200), users.createUser(create("é".repeat(200), "e@example.com")).getName(),
                "200 characters, not bytes");
        assertEquals("😀".repeat(200), users.createUser(create("😀".repeat(200), "s@example.com")).getName(),
                "200 code points, not UTF-16 units");
        StatusRuntimeException taken = assertThrows(StatusRuntimeException.class,
                () -> users.createUser(create("Bo", "ADA@example.com")));
        assertEquals(Status.Code.ALREADY_EXISTS, taken.getStatus().getCode());
        assertEquals("email: \"ada@example.com\" is already taken", taken.getStatus().getDescription());
    }

    @Test
    void getUserTakesAUuidInEitherCase() throws Exception {
        assertEquals(List.of(new Violation("id", "must be a valid UUID", "string.uuid")),
                refused(() -> users.getUser(GetUserRequest.newBuilder().setId("42").build()), "id", "string.uuid"));
        assertEquals("id: must be a valid UUID [string.uuid]",
                message(() -> users.getUser(GetUserRequest.newBuilder().setId("42").build())));
        refused(() -> users.getUser(GetUserRequest.getDefaultInstance()), "id", "string.uuid_empty");
        String hyphenated = "0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b";
        for (String bad : List.of(" " + hyphenated, hyphenated.replace("-", ""), "{" + hyphenated + "}",
                "urn:uuid:" + hyphenated, "0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6g")) {
            refused(() -> users.getUser(GetUserRequest.newBuilder().setId(bad).build()), "id", "string.uuid");
        }

        User ada = users.createUser(create("Ada", "ada@example.com"));
        assertEquals(ada, users.getUser(GetUserRequest.newBuilder().setId(ada.getId().toUpperCase()).build()));
        StatusRuntimeException missing = assertThrows(StatusRuntimeException.class,
                () -> users.getUser(GetUserRequest.newBuilder().setId(hyphenated.toUpperCase()).build()));
        assertEquals(Status.Code.NOT_FOUND, missing.getStatus().getCode());
        assertEquals("user \"" + hyphenated + "\" does not exist", missing.getStatus().getDescription());
    }

    @Test
    void listUsersPagesWithinTheRules() throws Exception {
        assertEquals(List.of(new Violation("page_size",
                        "must be greater than or equal to 0 and less than or equal to 1000", "int32.gte_lte")),
                refused(() -> users.listUsers(ListUsersRequest.newBuilder().setPageSize(-1).build()),
                        "page_size", "int32.gte_lte"));
        refused(() -> users.listUsers(ListUsersRequest.newBuilder().setPageSize(1001).build()), "page_size", "int32.gte_lte");
        refused(() -> users.listUsers(ListUsersRequest.newBuilder().setPageToken("next").build()), "page_token", "string.uuid");

        User a = users.createUser(create("A", "a@example.com"));
        User b = users.createUser(create("B", "b@example.com"));
        ListUsersResponse first = users.listUsers(ListUsersRequest.newBuilder().setPageSize(1).build());
        assertEquals(List.of(a), first.getUsersList());
        assertEquals(a.getId(), first.getNextPageToken());
        ListUsersResponse second = users.listUsers(ListUsersRequest.newBuilder().setPageSize(1000)
                .setPageToken(first.getNextPageToken().toUpperCase()).build());
        assertEquals(List.of(b), second.getUsersList());
        assertEquals("", second.getNextPageToken());
        assertEquals(List.of(a, b), users.listUsers(ListUsersRequest.getDefaultInstance()).getUsersList(), "0 means 50");
    }

    @Test
    void normalisationTrimsSpacesAndLowerCases() {
        assertEquals("Ada", Normalize.name("  Ada "));
        assertEquals("\u3000Ada\u00a0", Normalize.name(" \u3000Ada\u00a0  "), "spaces only, as Rust trims");
        assertEquals("ada@example.com", Normalize.email("Ada@Example.COM"));
        assertEquals("jürgen@bücher.de", Normalize.email("Jürgen@Bücher.DE"));
        assertEquals("0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b", Normalize.id("0190A3C4-5B6D-7E8F-9A0B-1C2D3E4F5A6B"));
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
