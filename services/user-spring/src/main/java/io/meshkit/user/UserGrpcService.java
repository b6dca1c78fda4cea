package io.meshkit.user;

import com.google.protobuf.Timestamp;
import io.grpc.Status;
import io.grpc.StatusException;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.StreamObserver;
import io.meshkit.user.v1.CreateUserRequest;
import io.meshkit.user.v1.GetUserRequest;
import io.meshkit.user.v1.ListUsersRequest;
import io.meshkit.user.v1.ListUsersResponse;
import io.meshkit.user.v1.User;
import io.meshkit.user.v1.UserServiceGrpc;
import java.time.Instant;
import org.springframework.stereotype.Service;

/**
 * {@code meshkit.user.v1.UserService}, answering as the Rust user-service does
 * (services/user/src/api.rs): the same statuses and messages, and keyset paging
 * over UUIDv7 ids. Every failure leaves as a status; none as UNKNOWN.
 *
 * <p>Requests arrive valid: user.proto's protovalidate rules are checked before
 * any handler by the meshkit starter's ValidationInterceptor (INVALID_ARGUMENT
 * with a BadRequest detail, as the Rust servers answer). What is left here is the
 * service's own normalisation ({@link Normalize}): the name trimmed, the email and
 * ids lower-cased.
 */
@Service
public class UserGrpcService extends UserServiceGrpc.UserServiceImplBase {
    static final int DEFAULT_PAGE = 50;

    private final UserStore store;

    public UserGrpcService(UserStore store) {
        this.store = store;
    }

    @Override
    public void createUser(CreateUserRequest req, StreamObserver<User> out) {
        answer("CreateUser", out, () -> {
            String name = Normalize.name(req.getName());
            String email = Normalize.email(req.getEmail());
            UserStore.Row row = new UserStore.Row(UuidV7.next().toString(), name, email, nowUs());
            try {
                store.insert(row);
            } catch (StatusException e) {
                if (e.getStatus().getCode() == Status.Code.ALREADY_EXISTS) {
                    throw Status.ALREADY_EXISTS
                            .withDescription("email: " + RustDebug.str(email) + " is already taken")
                            .asException();
                }
                throw e;
            }
            return toProto(row);
        });
    }

    @Override
    public void getUser(GetUserRequest req, StreamObserver<User> out) {
        answer("GetUser", out, () -> {
            String id = Normalize.id(req.getId());
            return store.find(id)
                    .map(UserGrpcService::toProto)
                    .orElseThrow(() -> Status.NOT_FOUND
                            .withDescription("user " + RustDebug.str(id) + " does not exist")
                            .asException());
        });
    }

    @Override
    public void listUsers(ListUsersRequest req, StreamObserver<ListUsersResponse> out) {
        answer("ListUsers", out, () -> {
            // page_size is 0..1000 (user.proto), 0 meaning the default.
            int limit = req.getPageSize() == 0 ? DEFAULT_PAGE : req.getPageSize();
            // page_token is empty or a UUID (user.proto): the last id of the previous page.
            String after = req.getPageToken().isEmpty() ? null : Normalize.id(req.getPageToken());
            Statuses.Page<UserStore.Row> page =
                    Statuses.finishPage(store.list(after, limit + 1), limit, UserStore.Row::id);
            ListUsersResponse.Builder res = ListUsersResponse.newBuilder().setNextPageToken(page.nextPageToken());
            page.rows().forEach(r -> res.addUsers(toProto(r)));
            return res.build();
        });
    }

    @FunctionalInterface
    private interface Handler<T> {
        T handle() throws StatusException;
    }

    /** Runs {@code handler} and answers with its value or its status; anything else is INTERNAL. */
    private static <T> void answer(String method, StreamObserver<T> out, Handler<T> handler) {
        T value;
        try {
            value = handler.handle();
        } catch (StatusException | StatusRuntimeException e) {
            out.onError(e);
            return;
        } catch (RuntimeException e) {
            UserStore.LOG.error("{} failed", method, e);
            out.onError(Status.INTERNAL.withDescription("internal error").asException());
            return;
        }
        out.onNext(value);
        out.onCompleted();
    }

    static User toProto(UserStore.Row row) {
        return User.newBuilder()
                .setId(row.id())
                .setName(row.name())
                .setEmail(row.email())
                .setCreateTime(timestamp(row.createTimeUs()))
                .build();
    }

    /** Micros since the epoch as a Timestamp (seconds rounded down, nanos in 0..1e9). */
    static Timestamp timestamp(long us) {
        return Timestamp.newBuilder()
                .setSeconds(Math.floorDiv(us, 1_000_000L))
                .setNanos((int) (Math.floorMod(us, 1_000_000L) * 1000))
                .build();
    }

    /** Now, in microseconds since the Unix epoch. */
    static long nowUs() {
        Instant now = Instant.now();
        return now.getEpochSecond() * 1_000_000L + now.getNano() / 1000;
    }
}
