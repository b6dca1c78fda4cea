package io.meshkit.spring;

import com.google.protobuf.ByteString;
import com.google.protobuf.DescriptorProtos.DescriptorProto;
import com.google.protobuf.DescriptorProtos.FieldDescriptorProto;
import com.google.protobuf.DescriptorProtos.FileDescriptorProto;
import com.google.protobuf.InvalidProtocolBufferException;
import io.grpc.ForwardingServerCall;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import java.util.List;

/**
 * Gives the descriptors that server reflection sends the {@code json_name} of each
 * field, as the Rust services' reflection does (theirs come from protoc's descriptor
 * set; grpc-java's from generated code, which leaves it out). Without it grpcurl
 * prints {@code create_time} where it prints {@code createTime} for a Rust instance.
 */
final class ReflectionJsonNames implements ServerInterceptor {
    private static final String V1 = io.grpc.reflection.v1.ServerReflectionGrpc.SERVICE_NAME;
    @SuppressWarnings("deprecation")
    private static final String V1ALPHA = io.grpc.reflection.v1alpha.ServerReflectionGrpc.SERVICE_NAME;

    @Override
    public <Q, R> ServerCall.Listener<Q> interceptCall(
            ServerCall<Q, R> call, Metadata headers, ServerCallHandler<Q, R> next) {
        String service = call.getMethodDescriptor().getServiceName();
        if (!V1.equals(service) && !V1ALPHA.equals(service)) {
            return next.startCall(call, headers);
        }
        return next.startCall(new ForwardingServerCall.SimpleForwardingServerCall<>(call) {
            @Override
            public void sendMessage(R message) {
                super.sendMessage(rewrite(message));
            }
        }, headers);
    }

    @SuppressWarnings({"unchecked", "deprecation"})
    static <R> R rewrite(R message) {
        if (message instanceof io.grpc.reflection.v1.ServerReflectionResponse r && r.hasFileDescriptorResponse()) {
            var files = r.getFileDescriptorResponse().toBuilder();
            fill(files.getFileDescriptorProtoList(), files::setFileDescriptorProto);
            return (R) r.toBuilder().setFileDescriptorResponse(files).build();
        }
        if (message instanceof io.grpc.reflection.v1alpha.ServerReflectionResponse r && r.hasFileDescriptorResponse()) {
            var files = r.getFileDescriptorResponse().toBuilder();
            fill(files.getFileDescriptorProtoList(), files::setFileDescriptorProto);
            return (R) r.toBuilder().setFileDescriptorResponse(files).build();
        }
        return message;
    }

    private interface Setter {
        Object set(int index, ByteString value);
    }

    private static void fill(List<ByteString> files, Setter set) {
        for (int i = 0; i < files.size(); i++) {
            set.set(i, withJsonNames(files.get(i)));
        }
    }

    static ByteString withJsonNames(ByteString file) {
        try {
            FileDescriptorProto.Builder b = FileDescriptorProto.parseFrom(file).toBuilder();
            b.getMessageTypeBuilderList().forEach(ReflectionJsonNames::fill);
            b.getExtensionBuilderList().forEach(ReflectionJsonNames::fill);
            return b.build().toByteString();
        } catch (InvalidProtocolBufferException e) {
            return file;
        }
    }

    private static void fill(DescriptorProto.Builder message) {
        message.getFieldBuilderList().forEach(ReflectionJsonNames::fill);
        message.getExtensionBuilderList().forEach(ReflectionJsonNames::fill);
        message.getNestedTypeBuilderList().forEach(ReflectionJsonNames::fill);
    }

    private static void fill(FieldDescriptorProto.Builder field) {
        if (!field.hasJsonName()) {
            field.setJsonName(jsonName(field.getName()));
        }
    }

    /** protoc's ToJsonName: drops each underscore and upper-cases the letter after it. */
    static String jsonName(String name) {
        StringBuilder out = new StringBuilder(name.length());
        boolean upper = false;
        for (int i = 0; i < name.length(); i++) {
            char c = name.charAt(i);
            if (c == '_') {
                upper = true;
            } else if (upper) {
                out.append(c >= 'a' && c <= 'z' ? (char) (c - 'a' + 'A') : c);
                upper = false;
            } else {
                out.append(c);
            }
        }
        return out.toString();
    }
}
