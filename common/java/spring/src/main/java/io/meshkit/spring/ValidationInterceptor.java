package io.meshkit.spring;

import java.util.List;
import java.util.stream.Collectors;

import build.buf.protovalidate.Config;
import build.buf.protovalidate.ValidationResult;
import build.buf.protovalidate.Validator;
import build.buf.protovalidate.ValidatorFactory;
import build.buf.protovalidate.exceptions.ValidationException;
import build.buf.validate.FieldPath;
import build.buf.validate.FieldPathElement;
import build.buf.validate.Violation;
import com.google.protobuf.Any;
import com.google.protobuf.Message;
import com.google.rpc.BadRequest;
import com.google.rpc.Code;
import io.grpc.ForwardingServerCallListener;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.ServerMethodDefinition;
import io.grpc.ServerServiceDefinition;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Checks every incoming request against the protovalidate rules of its message
 * type (the {@code (buf.validate.field)} and {@code (buf.validate.message)}
 * annotations of proto/) before the handler sees it, and refuses an invalid one
 * as the Rust servers do:
 *
 * <ul>
 *   <li>status INVALID_ARGUMENT;
 *   <li>description: the violations joined by {@code "; "}, each
 *       {@code {field}: {message} [{rule_id}]}, or {@code {message} [{rule_id}]}
 *       for a rule of the message itself (empty field path), e.g.
 *       {@code items[1].sku: value is required [required]};
 *   <li>trailer {@code grpc-status-details-bin}: a google.rpc.Status (code 3, the
 *       same message) with one detail, a google.rpc.BadRequest holding a
 *       FieldViolation per violation (field = the field path, description = the
 *       violation's message, reason = the rule id).
 * </ul>
 *
 * <p>The field path is protovalidate's canonical form ({@link #fieldPath}):
 * {@code a.b}, {@code items[1].sku}, {@code labels["k"]}.
 *
 * <p>A refused call runs no handler. Place it innermost, after the interceptors
 * that observe calls (instance header, span, metrics, deadline), so a refused
 * call is still named, traced and counted. Rules that cannot be compiled or
 * evaluated are a server fault: INTERNAL, logged. Messages without rules pass.
 * protovalidate compiles a type's rules once, on its first message; the starter
 * compiles those of every served method at start ({@link #warmUp}).
 */
public final class ValidationInterceptor implements ServerInterceptor {

    private static final Logger log = LoggerFactory.getLogger(ValidationInterceptor.class);

    private final Validator validator;

    /** With {@link #config()}: every violation, each rule evaluated as the protovalidate spec says. */
    public ValidationInterceptor() {
        this(ValidatorFactory.newBuilder().withConfig(config()).build());
    }

    /**
     * protovalidate's defaults but native rules off: protovalidate-java 1.3.0 turns them
     * on by default, and its native {@code string.pattern} wants the whole value to match
     * (re2j's {@code Pattern.matches}) where the spec, CEL's {@code matches()} and the
     * other runtimes take any match: an unanchored pattern such as user.proto's
     * {@code ^[^@]*$|@[^@.]+(\.[^@.]+)+$} refused every valid address. With native rules
     * off the standard rules run as their CEL expressions in validate.proto.
     */
    public static Config config() {
        return Config.newBuilder().setEnableNativeRules(false).build();
    }

    public ValidationInterceptor(Validator validator) {
        this.validator = validator;
    }

    public Validator validator() {
        return validator;
    }

    @Override
    public <Q, A> ServerCall.Listener<Q> interceptCall(ServerCall<Q, A> call, Metadata headers, ServerCallHandler<Q, A> next) {
        return new ForwardingServerCallListener.SimpleForwardingServerCallListener<>(next.startCall(call, headers)) {
            /** Set once this call was answered here: nothing more reaches the handler. */
            private boolean refused;

            @Override
            public void onMessage(Q message) {
                if (refused) {
                    return;
                }
                StatusRuntimeException error = message instanceof Message m ? check(m) : null;
                if (error == null) {
                    super.onMessage(message);
                    return;
                }
                refused = true;
                call.close(error.getStatus(), error.getTrailers() == null ? new Metadata() : error.getTrailers());
                // A streaming handler already started: it learns the call is over as on a
                // client's cancel. A unary one has not run and never will.
                super.onCancel();
            }

            @Override
            public void onHalfClose() {
                if (!refused) {
                    super.onHalfClose();
                }
            }

            @Override
            public void onReady() {
                if (!refused) {
                    super.onReady();
                }
            }

            @Override
            public void onCancel() {
                if (!refused) {
                    super.onCancel();
                }
            }

            @Override
            public void onComplete() {
                if (!refused) {
                    super.onComplete();
                }
            }
        };
    }

    /**
     * Compiles now the rules of every method's input in {@code services} (a server's
     * {@code getServices()}), so that no call pays for it and a rule that does not
     * compile stops the start, as in the Rust servers, instead of failing calls.
     * The starter calls it before the instance registers.
     *
     * @throws IllegalStateException naming the message whose rules do not compile
     */
    public void warmUp(List<ServerServiceDefinition> services) {
        for (ServerServiceDefinition service : services) {
            for (ServerMethodDefinition<?, ?> method : service.getMethods()) {
                if (method.getMethodDescriptor().getRequestMarshaller() instanceof MethodDescriptor.PrototypeMarshaller<?> p
                        && p.getMessagePrototype() instanceof Message prototype) {
                    try {
                        validator.validate(prototype);
                    } catch (ValidationException e) {
                        throw new IllegalStateException("the validation rules of "
                                + prototype.getDescriptorForType().getFullName() + " do not compile: " + e.getMessage(), e);
                    }
                }
            }
        }
    }

    /** The status refusing {@code message}, or null when it is valid. */
    public StatusRuntimeException check(Message message) {
        ValidationResult result;
        try {
            result = validator.validate(message);
        } catch (ValidationException | RuntimeException e) {
            log.error("validating a {} failed", message.getDescriptorForType().getFullName(), e);
            return Status.INTERNAL.withDescription("validating the request failed").asRuntimeException();
        }
        if (result.isSuccess()) {
            return null;
        }
        return invalidArgument(result.getViolations().stream().map(build.buf.protovalidate.Violation::toProto).toList());
    }

    /** How many violations the description of a refusal lists; the rest are counted (as in Rust). */
    public static final int LISTED_IN_MESSAGE = 5;
    /**
     * How many violations the BadRequest of a refusal lists (as in Rust). Both travel in
     * the trailers, which peers bound: a request with a hundred broken items must not be
     * answered with a status too large to deliver.
     */
    public static final int LISTED_IN_DETAILS = 20;

    /** INVALID_ARGUMENT for {@code violations} (at least one), with the BadRequest detail. */
    public static StatusRuntimeException invalidArgument(List<Violation> violations) {
        String description = describe(violations.subList(0, Math.min(violations.size(), LISTED_IN_MESSAGE)));
        if (violations.size() > LISTED_IN_MESSAGE) {
            description += "; and " + (violations.size() - LISTED_IN_MESSAGE) + " more";
        }
        BadRequest.Builder badRequest = BadRequest.newBuilder();
        for (Violation v : violations.subList(0, Math.min(violations.size(), LISTED_IN_DETAILS))) {
            badRequest.addFieldViolationsBuilder()
                    .setField(fieldPath(v.getField()))
                    .setDescription(v.getMessage())
                    .setReason(v.getRuleId());
        }
        com.google.rpc.Status status = com.google.rpc.Status.newBuilder()
                .setCode(Code.INVALID_ARGUMENT_VALUE)
                .setMessage(description)
                .addDetails(Any.pack(badRequest.build()))
                .build();
        return StatusProto.toStatusRuntimeException(status);
    }

    /** The violations joined by {@code "; "}: {@code field: message [rule_id]}, or {@code message [rule_id]}. */
    public static String describe(List<Violation> violations) {
        return violations.stream().map(v -> {
            String field = fieldPath(v.getField());
            String text = v.getMessage() + " [" + v.getRuleId() + "]";
            return field.isEmpty() ? text : field + ": " + text;
        }).collect(Collectors.joining("; "));
    }

    /**
     * protovalidate's canonical string of a field path: the elements' field names
     * joined by dots, each followed by its subscript if any: {@code [index]},
     * {@code [true]}, {@code [-1]}, {@code [7]}, or a string map key quoted with
     * {@code \} and {@code "} escaped ({@code ["k"]}). Empty for the message itself.
     */
    public static String fieldPath(FieldPath path) {
        StringBuilder s = new StringBuilder();
        for (FieldPathElement e : path.getElementsList()) {
            if (!s.isEmpty()) {
                s.append('.');
            }
            s.append(e.getFieldName());
            switch (e.getSubscriptCase()) {
                case INDEX -> s.append('[').append(Long.toUnsignedString(e.getIndex())).append(']');
                case BOOL_KEY -> s.append('[').append(e.getBoolKey()).append(']');
                case INT_KEY -> s.append('[').append(e.getIntKey()).append(']');
                case UINT_KEY -> s.append('[').append(Long.toUnsignedString(e.getUintKey())).append(']');
                case STRING_KEY -> s.append("[\"")
                        .append(e.getStringKey().replace("\\", "\\\\").replace("\"", "\\\""))
                        .append("\"]");
                case SUBSCRIPT_NOT_SET -> { }
            }
        }
        return s.toString();
    }
}
