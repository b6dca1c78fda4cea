package io.meshkit.spring;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.net.InetSocketAddress;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

import build.buf.validate.FieldPath;
import build.buf.validate.FieldPathElement;
import build.buf.validate.FieldRules;
import build.buf.validate.Rule;
import build.buf.validate.ValidateProto;
import com.google.protobuf.DescriptorProtos;
import com.google.protobuf.Descriptors;
import com.google.protobuf.DynamicMessage;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import io.grpc.ManagedChannel;
import io.grpc.MethodDescriptor;
import io.grpc.Server;
import io.grpc.ServerInterceptors;
import io.grpc.ServerServiceDefinition;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.NettyServerBuilder;
import io.grpc.protobuf.ProtoUtils;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.ServerCalls;
import io.grpc.stub.StreamObserver;
import io.meshkit.order.v1.CreateOrderRequest;
import io.meshkit.order.v1.Order;
import io.meshkit.order.v1.OrderItem;
import io.meshkit.order.v1.OrderServiceGrpc;
import io.meshkit.scheduler.v1.Fence;
import io.meshkit.scheduler.v1.RunJobRequest;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/** The starter's ValidationInterceptor: the Rust servers' INVALID_ARGUMENT contract, no etcd needed. */
class ValidationInterceptorTest {

    private static final String USER = "0190f0c2-7b1e-7a3c-9d2e-4f5a6b7c8d9e";

    private final AtomicInteger handled = new AtomicInteger();
    private Server server;
    private ManagedChannel channel;

    @BeforeEach
    void start() throws Exception {
        OrderServiceGrpc.OrderServiceImplBase orders = new OrderServiceGrpc.OrderServiceImplBase() {
            @Override
            public void createOrder(CreateOrderRequest request, StreamObserver<Order> response) {
                handled.incrementAndGet();
                response.onNext(Order.newBuilder().setUserId(request.getUserId()).addAllItems(request.getItemsList()).build());
                response.onCompleted();
            }
        };
        server = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0))
                .addService(ServerInterceptors.intercept(orders, new ValidationInterceptor()))
                .build()
                .start();
        channel = NettyChannelBuilder.forAddress("127.0.0.1", server.getPort()).usePlaintext().build();
    }

    @AfterEach
    void stop() throws Exception {
        channel.shutdownNow();
        server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }

    @Test
    void anInvalidRequestIsRefusedWithEveryViolationAndReachesNoHandler() throws InvalidProtocolBufferException {
        CreateOrderRequest bad = CreateOrderRequest.newBuilder()
                .setUserId(USER)
                .addItems(OrderItem.newBuilder().setSku("book-1").setQuantity(1))
                .addItems(OrderItem.newBuilder().setSku("").setQuantity(0))
                .build();
        StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
                () -> OrderServiceGrpc.newBlockingStub(channel).createOrder(bad));
        assertEquals(0, handled.get(), "no handler ran");
        assertEquals(Status.Code.INVALID_ARGUMENT, e.getStatus().getCode());
        String description = "items[1].sku: value is required [required]; "
                + "items[1].quantity: must be greater than or equal to 1 and less than or equal to 10000 [int32.gte_lte]";
        assertEquals(description, e.getStatus().getDescription());

        com.google.rpc.Status details = StatusProto.fromThrowable(e);
        assertNotNull(details, "grpc-status-details-bin");
        assertEquals(3, details.getCode());
        assertEquals(description, details.getMessage());
        assertEquals(1, details.getDetailsCount());
        BadRequest badRequest = details.getDetails(0).unpack(BadRequest.class);
        assertEquals(List.of(
                BadRequest.FieldViolation.newBuilder().setField("items[1].sku")
                        .setDescription("value is required").setReason("required").build(),
                BadRequest.FieldViolation.newBuilder().setField("items[1].quantity")
                        .setDescription("must be greater than or equal to 1 and less than or equal to 10000")
                        .setReason("int32.gte_lte").build()),
                badRequest.getFieldViolationsList());
    }

    @Test
    void aValidRequestReachesTheHandlerUnchanged() {
        CreateOrderRequest good = CreateOrderRequest.newBuilder()
                .setUserId(USER)
                .addItems(OrderItem.newBuilder().setSku("book-1").setQuantity(2))
                .build();
        Order order = OrderServiceGrpc.newBlockingStub(channel).createOrder(good);
        assertEquals(1, handled.get());
        assertEquals(USER, order.getUserId());
        assertEquals(good.getItemsList(), order.getItemsList());
    }

    @Test
    void aRuleOfTheMessageItselfHasAnEmptyFieldPath() throws InvalidProtocolBufferException {
        ValidationInterceptor interceptor = new ValidationInterceptor();
        RunJobRequest.Builder run = RunJobRequest.newBuilder().setRunId(USER).setJob("j").setHandler("h")
                .setShardIndex(1).setShardTotal(1).setFence(Fence.newBuilder().setClusterId(1).setRevision(7));
        StatusRuntimeException e = interceptor.check(run.build());
        assertNotNull(e);
        assertEquals("0 <= shard_index < shard_total [shard]", e.getStatus().getDescription());
        BadRequest.FieldViolation v = StatusProto.fromThrowable(e).getDetails(0).unpack(BadRequest.class).getFieldViolations(0);
        assertEquals("", v.getField());
        assertEquals("shard", v.getReason());
        assertEquals("0 <= shard_index < shard_total", v.getDescription());

        assertNull(interceptor.check(run.setShardTotal(2).build()), "0 of 2 is valid");
        e = interceptor.check(run.clearFence().build());
        assertEquals("fence: value is required [required]", e.getStatus().getDescription());
    }

    @Test
    void warmUpCompilesEveryInputsRulesAndRefusesRulesThatDoNotCompile() throws Exception {
        new ValidationInterceptor().warmUp(server.getServices());

        // A request type whose CEL rule does not compile: the start fails, naming it.
        DescriptorProtos.FieldOptions broken = DescriptorProtos.FieldOptions.newBuilder()
                .setExtension(ValidateProto.field, FieldRules.newBuilder()
                        .addCel(Rule.newBuilder().setId("broken").setExpression("this +")).build())
                .build();
        Descriptors.FileDescriptor file = Descriptors.FileDescriptor.buildFrom(DescriptorProtos.FileDescriptorProto.newBuilder()
                .setName("test/broken.proto").setPackage("test").setSyntax("proto3")
                .addDependency(ValidateProto.getDescriptor().getName())
                .addMessageType(DescriptorProtos.DescriptorProto.newBuilder().setName("Req")
                        .addField(DescriptorProtos.FieldDescriptorProto.newBuilder().setName("s").setNumber(1)
                                .setType(DescriptorProtos.FieldDescriptorProto.Type.TYPE_STRING).setOptions(broken)))
                .build(), new Descriptors.FileDescriptor[] {ValidateProto.getDescriptor()});
        DynamicMessage req = DynamicMessage.getDefaultInstance(file.findMessageTypeByName("Req"));
        MethodDescriptor<DynamicMessage, DynamicMessage> method = MethodDescriptor.<DynamicMessage, DynamicMessage>newBuilder()
                .setType(MethodDescriptor.MethodType.UNARY)
                .setFullMethodName("test.Broken/Call")
                .setRequestMarshaller(ProtoUtils.marshaller(req))
                .setResponseMarshaller(ProtoUtils.marshaller(req))
                .build();
        ServerServiceDefinition service = ServerServiceDefinition.builder("test.Broken")
                .addMethod(method, ServerCalls.asyncUnaryCall((request, response) -> response.onCompleted()))
                .build();
        IllegalStateException e = assertThrows(IllegalStateException.class,
                () -> new ValidationInterceptor().warmUp(List.of(service)));
        assertTrue(e.getMessage().startsWith("the validation rules of test.Req do not compile"), e.getMessage());
    }

    @Test
    void patternsMatchAnywhereAsTheSpecSays() {
        // protovalidate-java's native string.pattern (on by default in 1.3.0) wants a
        // whole-value match; the spec (CEL matches()) and the other runtimes any match.
        assertFalse(ValidationInterceptor.config().isNativeRulesEnabled());
    }

    @Test
    void fieldPathsTakeProtovalidatesCanonicalForm() {
        assertEquals("", ValidationInterceptor.fieldPath(FieldPath.getDefaultInstance()));
        assertEquals("a.b", ValidationInterceptor.fieldPath(path(
                FieldPathElement.newBuilder().setFieldName("a"), FieldPathElement.newBuilder().setFieldName("b"))));
        assertEquals("items[1].sku", ValidationInterceptor.fieldPath(path(
                FieldPathElement.newBuilder().setFieldName("items").setIndex(1),
                FieldPathElement.newBuilder().setFieldName("sku"))));
        assertEquals("m[\"k\"].v", ValidationInterceptor.fieldPath(path(
                FieldPathElement.newBuilder().setFieldName("m").setStringKey("k"),
                FieldPathElement.newBuilder().setFieldName("v"))));
        assertEquals("m[\"a\\\"b\\\\c\"]", ValidationInterceptor.fieldPath(path(
                FieldPathElement.newBuilder().setFieldName("m").setStringKey("a\"b\\c"))));
        assertEquals("m[true]", ValidationInterceptor.fieldPath(path(FieldPathElement.newBuilder().setFieldName("m").setBoolKey(true))));
        assertEquals("m[-3]", ValidationInterceptor.fieldPath(path(FieldPathElement.newBuilder().setFieldName("m").setIntKey(-3))));
        assertEquals("m[18446744073709551615]",
                ValidationInterceptor.fieldPath(path(FieldPathElement.newBuilder().setFieldName("m").setUintKey(-1L))));
    }

    private static FieldPath path(FieldPathElement.Builder... elements) {
        FieldPath.Builder p = FieldPath.newBuilder();
        for (FieldPathElement.Builder e : elements) {
            p.addElements(e);
        }
        return p.build();
    }
}
