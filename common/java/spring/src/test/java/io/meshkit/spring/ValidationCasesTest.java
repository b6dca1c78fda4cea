package io.meshkit.spring;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.stream.Stream;

import com.google.protobuf.Descriptors.Descriptor;
import com.google.protobuf.Descriptors.FileDescriptor;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Message;
import com.google.protobuf.util.JsonFormat;
import com.google.rpc.BadRequest;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.meshkit.notification.v1.NotificationProto;
import io.meshkit.order.v1.OrderProto;
import io.meshkit.scheduler.v1.SchedulerProto;
import io.meshkit.user.v1.UserProto;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.TestFactory;
import tools.jackson.databind.JsonNode;
import tools.jackson.databind.json.JsonMapper;

/**
 * The shared table services/integration-tests/fixtures/validation-cases.json, which
 * the Rust validator and protovalidate-python check too: each case's proto3 JSON
 * input, parsed into its message type, draws exactly the listed violations (field
 * path, rule id, message), in order, from protovalidate-java as the starter's
 * ValidationInterceptor runs it, and the same ones in the BadRequest of its status.
 */
class ValidationCasesTest {

    static final String FIXTURE = "services/integration-tests/fixtures/validation-cases.json";

    /** One violation as the table names it. */
    record Expected(String field, String rule, String message) {
        @Override
        public String toString() {
            return (field.isEmpty() ? "" : field + ": ") + message + " [" + rule + "]";
        }
    }

    @TestFactory
    Stream<DynamicTest> everyCaseDrawsTheListedViolations() throws Exception {
        Map<String, Message> types = messageTypes(
                UserProto.getDescriptor(), OrderProto.getDescriptor(),
                NotificationProto.getDescriptor(), SchedulerProto.getDescriptor());
        JsonNode root = JsonMapper.builder().build().readTree(fixture().toFile());
        JsonNode cases = root.get("cases");
        assertNotNull(cases, FIXTURE + " has no \"cases\"");
        assertFalse(cases.isEmpty(), FIXTURE + " has no cases");
        ValidationInterceptor interceptor = new ValidationInterceptor();
        JsonFormat.Parser parser = JsonFormat.parser();

        List<DynamicTest> tests = new ArrayList<>();
        int i = 0;
        for (JsonNode c : cases) {
            int index = i++;
            String type = c.get("message").asString();
            String input = c.get("input").toString();
            List<Expected> expected = new ArrayList<>();
            for (JsonNode v : c.get("violations")) {
                expected.add(new Expected(v.get("field").asString(), v.get("rule").asString(), v.get("message").asString()));
            }
            String shown = input.length() > 60 ? input.substring(0, 57) + "..." : input;
            tests.add(DynamicTest.dynamicTest("#" + index + " " + type + " " + shown, () -> {
                Message prototype = types.get(type);
                assertNotNull(prototype, "no generated class for " + type);
                Message.Builder builder = prototype.newBuilderForType();
                parser.merge(input, builder);
                Message message = builder.build();

                // What protovalidate-java reports…
                List<Expected> found = new ArrayList<>();
                for (build.buf.protovalidate.Violation v : interceptor.validator().validate(message).getViolations()) {
                    found.add(new Expected(ValidationInterceptor.fieldPath(v.toProto().getField()), v.toProto().getRuleId(),
                            v.toProto().getMessage()));
                }
                assertEquals(expected, found, "case #" + index + " " + type + " " + input);

                // …and what a caller of a meshkit Java server is told.
                StatusRuntimeException refused = interceptor.check(message);
                System.out.println("validation-cases #" + index + " " + type + ": "
                        + (refused == null ? "valid" : refused.getStatus().getDescription()));
                if (expected.isEmpty()) {
                    assertNull(refused, "a valid request passes");
                    return;
                }
                assertNotNull(refused);
                assertEquals(Status.Code.INVALID_ARGUMENT, refused.getStatus().getCode());
                assertEquals(expected, badRequest(refused), "the BadRequest detail");
            }));
        }
        return tests.stream();
    }

    private static List<Expected> badRequest(StatusRuntimeException e) throws InvalidProtocolBufferException {
        com.google.rpc.Status status = StatusProto.fromThrowable(e);
        assertNotNull(status, "grpc-status-details-bin");
        assertEquals(1, status.getDetailsCount());
        List<Expected> found = new ArrayList<>();
        for (BadRequest.FieldViolation v : status.getDetails(0).unpack(BadRequest.class).getFieldViolationsList()) {
            found.add(new Expected(v.getField(), v.getReason(), v.getDescription()));
        }
        return found;
    }

    /** Every message type of {@code files}, by full name, as its generated class's default instance. */
    static Map<String, Message> messageTypes(FileDescriptor... files) throws ReflectiveOperationException {
        Map<String, Message> types = new HashMap<>();
        for (FileDescriptor file : files) {
            // meshkit's files set java_multiple_files: a top-level message is a class of the package.
            String javaPackage = file.getOptions().getJavaPackage();
            for (Descriptor d : file.getMessageTypes()) {
                add(types, d, javaPackage + "." + d.getName());
            }
        }
        return types;
    }

    private static void add(Map<String, Message> types, Descriptor d, String className) throws ReflectiveOperationException {
        Message prototype = (Message) Class.forName(className).getMethod("getDefaultInstance").invoke(null);
        assertEquals(d.getFullName(), prototype.getDescriptorForType().getFullName(), className);
        types.put(d.getFullName(), prototype);
        for (Descriptor nested : d.getNestedTypes()) {
            if (!nested.getOptions().getMapEntry()) {
                add(types, nested, className + "$" + nested.getName());
            }
        }
    }

    /** The table, found from the module's directory (or any below the repository root) upwards. */
    static Path fixture() {
        for (Path dir = Path.of("").toAbsolutePath(); dir != null; dir = dir.getParent()) {
            Path candidate = dir.resolve(FIXTURE);
            if (Files.isRegularFile(candidate)) {
                return candidate;
            }
        }
        throw new IllegalStateException(FIXTURE + " not found above " + Path.of("").toAbsolutePath());
    }
}
