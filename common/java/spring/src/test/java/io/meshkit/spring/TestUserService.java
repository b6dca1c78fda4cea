package io.meshkit.spring;

import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;

import io.grpc.Status;
import io.grpc.stub.StreamObserver;
import io.meshkit.user.v1.GetUserRequest;
import io.meshkit.user.v1.ListUsersRequest;
import io.meshkit.user.v1.ListUsersResponse;
import io.meshkit.user.v1.User;
import io.meshkit.user.v1.UserServiceGrpc;

/**
 * GetUser {@link #MISSING} fails NOT_FOUND, {@link #SLOW} takes 800 ms, any other id is
 * a user named Ada; ListUsers counts its runs. The ids are UUIDs, as user.proto's rules
 * (checked by the ValidationInterceptor before any handler) want them.
 */
class TestUserService extends UserServiceGrpc.UserServiceImplBase {

    static final String ID = "0190f0c2-7b1e-7a3c-9d2e-4f5a6b7c8d9e";
    static final String MISSING = "0190f0c2-0000-7000-8000-000000000404";
    static final String SLOW = "0190f0c2-0000-7000-8000-000000000800";

    final AtomicInteger listRuns = new AtomicInteger();
    /** What Deadlines.remainingMillis() said in the last GetUser, -1 for none. */
    final AtomicLong remainingMillis = new AtomicLong(-2);

    @Override
    public void getUser(GetUserRequest request, StreamObserver<User> response) {
        remainingMillis.set(Deadlines.remainingMillis().orElse(-1));
        if (request.getId().equals(MISSING)) {
            response.onError(Status.NOT_FOUND.withDescription("no such user").asRuntimeException());
            return;
        }
        if (request.getId().equals(SLOW)) {
            try {
                Thread.sleep(800);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
        response.onNext(User.newBuilder().setId(request.getId()).setName("Ada").build());
        response.onCompleted();
    }

    @Override
    public void listUsers(ListUsersRequest request, StreamObserver<ListUsersResponse> response) {
        listRuns.incrementAndGet();
        response.onNext(ListUsersResponse.getDefaultInstance());
        response.onCompleted();
    }
}
