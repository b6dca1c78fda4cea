#!/usr/bin/env python3
"""A Python grpcio client generated from proto/, calling meshkit through the
gateway: create a user and an order, read them back, list the user's orders,
and check that a missing user comes back as NOT_FOUND.

    client.py --target 127.0.0.1:8080 --proto-dir proto [--email e]

Stubs are generated into a temp dir with grpcio-tools at start, from the
same .proto files the Rust services are built from. Prints one JSON line.
"""

import argparse
import importlib
import json
import sys

import grpc

import stubs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--email", default="py@example.com")
    args = parser.parse_args()

    stubs.load(args.proto_dir, ["meshkit/user/v1/user.proto", "meshkit/order/v1/order.proto"])
    user_pb2 = importlib.import_module("meshkit.user.v1.user_pb2")
    user_grpc = importlib.import_module("meshkit.user.v1.user_pb2_grpc")
    order_pb2 = importlib.import_module("meshkit.order.v1.order_pb2")
    order_grpc = importlib.import_module("meshkit.order.v1.order_pb2_grpc")

    with grpc.insecure_channel(args.target) as channel:
        users = user_grpc.UserServiceStub(channel)
        orders = order_grpc.OrderServiceStub(channel)
        user = users.CreateUser(user_pb2.CreateUserRequest(name="Py", email=args.email), timeout=10)
        again = users.GetUser(user_pb2.GetUserRequest(id=user.id), timeout=10)
        assert again.email == args.email, again
        order = orders.CreateOrder(
            order_pb2.CreateOrderRequest(user_id=user.id, items=[order_pb2.OrderItem(sku="py-1", quantity=2)]),
            timeout=10,
        )
        fetched = orders.GetOrder(order_pb2.GetOrderRequest(id=order.id), timeout=10)
        listed = orders.ListOrders(order_pb2.ListOrdersRequest(user_id=user.id), timeout=10)
        try:
            users.GetUser(user_pb2.GetUserRequest(id="0190c3a4-0000-7000-8000-000000000000"), timeout=10)
            missing = "OK"
        except grpc.RpcError as e:
            missing = e.code().name
    print(
        json.dumps(
            {
                "user_id": user.id,
                "order_id": order.id,
                "order_status": order_pb2.OrderStatus.Name(fetched.status),
                "listed": [o.id for o in listed.orders],
                "missing_user": missing,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
