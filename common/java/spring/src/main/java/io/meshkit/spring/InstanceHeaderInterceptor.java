package io.meshkit.spring;

import io.grpc.ForwardingServerCall;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;

/**
 * Names the instance that served a call in the {@code x-meshkit-instance}
 * response header, as every meshkit server does: in the headers, or in the
 * trailers when the call fails before sending any (a trailers-only response,
 * whose trailers are its only headers). Run it first, so that it sees every
 * answer, the other interceptors' refusals included.
 */
public final class InstanceHeaderInterceptor implements ServerInterceptor {

    public static final Metadata.Key<String> KEY = Metadata.Key.of("x-meshkit-instance", Metadata.ASCII_STRING_MARSHALLER);

    private final String instanceId;

    public InstanceHeaderInterceptor(String instanceId) {
        this.instanceId = instanceId;
    }

    @Override
    public <Q, A> ServerCall.Listener<Q> interceptCall(ServerCall<Q, A> call, Metadata headers, ServerCallHandler<Q, A> next) {
        return next.startCall(new ForwardingServerCall.SimpleForwardingServerCall<>(call) {
            private boolean headersSent;

            @Override
            public void sendHeaders(Metadata responseHeaders) {
                responseHeaders.discardAll(KEY);
                responseHeaders.put(KEY, instanceId);
                headersSent = true;
                super.sendHeaders(responseHeaders);
            }

            @Override
            public void close(Status status, Metadata trailers) {
                if (!headersSent) {
                    trailers.discardAll(KEY);
                    trailers.put(KEY, instanceId);
                }
                super.close(status, trailers);
            }
        }, headers);
    }
}
