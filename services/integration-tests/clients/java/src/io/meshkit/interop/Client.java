package io.meshkit.interop;

import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.NettyChannelBuilder;
import io.meshkit.order.v1.CreateOrderRequest;
import io.meshkit.order.v1.GetOrderRequest;
import io.meshkit.order.v1.ListOrdersRequest;
import io.meshkit.order.v1.Order;
import io.meshkit.order.v1.OrderItem;
import io.meshkit.order.v1.OrderServiceGrpc;
import io.meshkit.user.v1.CreateUserRequest;
import io.meshkit.user.v1.GetUserRequest;
import io.meshkit.user.v1.User;
import io.meshkit.user.v1.UserServiceGrpc;
import java.util.concurrent.TimeUnit;

/**
 * A Java client generated from meshkit's proto/ with grpc-java, calling through
 * the gateway: create a user and an order, read them back, list the user's
 * orders, and check that a missing user is NOT_FOUND. Prints one JSON line.
 *
 * <pre>java -cp CLASSPATH io.meshkit.interop.Client 127.0.0.1:8080 email@example.com</pre>
 */
public final class Client {
    private Client() {}

    public static void main(String[] args) throws Exception {
        String target = args.length > 0 ? args[0] : "127.0.0.1:8080";
        String email = args.length > 1 ? args[1] : "java@example.com";
        ManagedChannel channel = NettyChannelBuilder.forTarget(target).usePlaintext().build();
        try {
            UserServiceGrpc.UserServiceBlockingStub users =
                    UserServiceGrpc.newBlockingStub(channel).withDeadlineAfter(10, TimeUnit.SECONDS);
            OrderServiceGrpc.OrderServiceBlockingStub orders =
                    OrderServiceGrpc.newBlockingStub(channel).withDeadlineAfter(10, TimeUnit.SECONDS);
            User user = users.createUser(CreateUserRequest.newBuilder().setName("Java").setEmail(email).build());
            User again = users.getUser(GetUserRequest.newBuilder().setId(user.getId()).build());
            if (!again.getEmail().equals(email)) {
                throw new IllegalStateException("read back " + again.getEmail());
            }
            Order order = orders.createOrder(CreateOrderRequest.newBuilder()
                    .setUserId(user.getId())
                    .addItems(OrderItem.newBuilder().setSku("java-1").setQuantity(4))
                    .build());
            Order fetched = orders.getOrder(GetOrderRequest.newBuilder().setId(order.getId()).build());
            int listed = orders.listOrders(ListOrdersRequest.newBuilder().setUserId(user.getId()).build())
                    .getOrdersCount();
            String missing = "OK";
            try {
                users.getUser(GetUserRequest.newBuilder().setId("0190c3a4-0000-7000-8000-000000000000").build());
            } catch (StatusRuntimeException e) {
                missing = e.getStatus().getCode().name();
            }
            System.out.printf(
                    "{\"user_id\":\"%s\",\"order_id\":\"%s\",\"order_status\":\"%s\",\"quantity\":%d,\"listed\":%d,\"missing_user\":\"%s\"}%n",
                    user.getId(), fetched.getId(), fetched.getStatus().name(), fetched.getItems(0).getQuantity(),
                    listed, missing);
        } finally {
            channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        }
    }
}
