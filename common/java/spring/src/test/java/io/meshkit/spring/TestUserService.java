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

/** GetUser "missing" fails NOT_FOUND, "slow" takes 800 ms; ListUsers counts its runs. */
class TestUserService extends UserServiceGrpc.UserServiceImplBase {

    final AtomicInteger listRuns = new AtomicInteger();
    /** What Deadlines.remainingMillis() said in the last GetUser, -1 for none. */
    final AtomicLong remainingMillis = new AtomicLong(-2);

    @Override
    public void getUser(GetUserRequest request, StreamObserver<User> response) {
        remainingMillis.set(Deadlines.remainingMillis().orElse(-1));
        if (request.getId().equals("missing")) {
            response.onError(Status.NOT_FOUND.withDescription("no such user").asRuntimeException());
            return;
        }
        if (request.getId().equals("slow")) {
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
