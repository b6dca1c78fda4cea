package io.meshkit.spring;

import io.grpc.Context;
import io.grpc.Contexts;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;

/**
 * Answers DEADLINE_EXCEEDED, running nothing further, a call whose deadline
 * has already passed when it reaches this interceptor (it arrived with a tiny
 * {@code grpc-timeout}, or waited for an executor thread). grpc-java turns an
 * incoming {@code grpc-timeout} into the call Context's deadline and, once it
 * passes, cancels the call and skips a unary handler; but it still runs the
 * interceptors after this one, and a streaming handler starts anyway. Place
 * it after the interceptors that observe calls (the instance header, the
 * span, the metrics), so a refused call is still named, traced and counted.
 * Handlers bound their own work with {@link Deadlines}.
 */
public final class DeadlineInterceptor implements ServerInterceptor {

    @Override
    public <Q, A> ServerCall.Listener<Q> interceptCall(ServerCall<Q, A> call, Metadata headers, ServerCallHandler<Q, A> next) {
        Context context = Context.current();
        if (!context.isCancelled()) {
            return next.startCall(call, headers);
        }
        Status status = Contexts.statusFromCancelled(context);
        if (status == null || status.getCode() == Status.Code.DEADLINE_EXCEEDED) {
            status = Status.DEADLINE_EXCEEDED.withDescription("the deadline passed before the call was handled");
        }
        call.close(status, new Metadata());
        return new ServerCall.Listener<>() {};
    }
}
