#!/usr/bin/env python3
"""A non-Rust instance joining the mesh: a Python grpcio UserService that
registers itself in etcd by the registry contract (docs/REGISTRY.md), so
meshkit's balanced channels, and so the gateway, send it calls.

    server.py --etcd http://127.0.0.1:2379 --listen 127.0.0.1:0 --instance py-1 --proto-dir proto

It speaks to etcd through etcd's JSON gateway (/v3/...), which every etcd 3.4+
serves on its client port, so it needs nothing but grpcio:

  1. grant a lease (TTL --ttl seconds);
  2. put /meshkit/services/meshkit.user.v1.UserService/<instance> with the
     lease, value {"addr","zone","weight","version","metadata"};
  3. keep the lease alive every TTL/3; if etcd answers TTL 0 (the lease is
     gone) or the key is missing, grant again and put again;
  4. on SIGTERM: revoke the lease (watchers drop the instance at once), let
     in-flight calls finish, exit.

Users live in memory; every answer carries `x-meshkit-instance`.
"""

import argparse
import base64
import importlib
import json
import signal
import sys
import threading
import time
import urllib.request
import uuid
from concurrent import futures

import grpc

import stubs

SERVICE = "meshkit.user.v1.UserService"


class Etcd:
    """The few etcd calls the registry contract needs, over the JSON gateway."""

    def __init__(self, endpoint):
        self.endpoint = endpoint.rstrip("/")
        if not self.endpoint.startswith("http"):
            self.endpoint = "http://" + self.endpoint

    def call(self, path, body):
        req = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=3) as resp:
            # Streaming endpoints (keepalive) answer one JSON object per line.
            return json.loads(resp.readline() or b"{}")

    def grant(self, ttl):
        return self.call("/v3/lease/grant", {"TTL": ttl})["ID"]

    def put(self, key, value, lease):
        b64 = lambda s: base64.b64encode(s.encode()).decode()
        self.call("/v3/kv/put", {"key": b64(key), "value": b64(value), "lease": lease})

    def exists(self, key):
        b64 = base64.b64encode(key.encode()).decode()
        return int(self.call("/v3/kv/range", {"key": b64, "count_only": True}).get("count", "0")) > 0

    def keepalive(self, lease):
        result = self.call("/v3/lease/keepalive", {"ID": lease}).get("result", {})
        return int(result.get("TTL", "0"))

    def revoke(self, lease):
        self.call("/v3/lease/revoke", {"ID": lease})


class Registration(threading.Thread):
    def __init__(self, etcd, key, value, ttl):
        super().__init__(daemon=True)
        self.etcd, self.key, self.value, self.ttl = etcd, key, value, ttl
        self.lease = None
        self.stopped = threading.Event()

    def register(self):
        self.lease = self.etcd.grant(self.ttl)
        self.etcd.put(self.key, self.value, self.lease)

    def run(self):
        while not self.stopped.wait(self.ttl / 3):
            try:
                if self.lease is None or self.etcd.keepalive(self.lease) <= 0 or not self.etcd.exists(self.key):
                    self.register()
            except Exception as e:  # etcd unreachable: keep trying, the lease may still live
                print(f"registry: {e}", file=sys.stderr, flush=True)

    def stop(self):
        self.stopped.set()
        if self.lease is not None:
            try:
                self.etcd.revoke(self.lease)
            except Exception as e:
                print(f"registry: revoke failed: {e}", file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", default="http://127.0.0.1:2379")
    parser.add_argument("--prefix", default="/meshkit")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--instance", default="py-" + uuid.uuid4().hex[:8])
    parser.add_argument("--ttl", type=int, default=5)
    parser.add_argument("--proto-dir", required=True)
    args = parser.parse_args()

    stubs.load(args.proto_dir, ["meshkit/user/v1/user.proto"])
    pb = importlib.import_module("meshkit.user.v1.user_pb2")
    pb_grpc = importlib.import_module("meshkit.user.v1.user_pb2_grpc")
    # Only now: protovalidate imports buf.validate.validate_pb2, which stubs.load generated.
    import protovalidate
    from validation_cases import describe

    validator = protovalidate.Validator()
    instance = args.instance
    users = {}
    lock = threading.Lock()

    class Users(pb_grpc.UserServiceServicer):
        def _tag(self, context):
            context.set_trailing_metadata((("x-meshkit-instance", instance),))
            context.send_initial_metadata((("x-meshkit-instance", instance),))

        def _check(self, request, context):
            """user.proto's rules, checked as every meshkit server checks them."""
            violations = [v.proto for v in validator.collect_violations(request)]
            if violations:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, describe(violations))

        def CreateUser(self, request, context):
            self._tag(context)
            self._check(request, context)
            user = pb.User(id=str(uuid.uuid4()), name=request.name, email=request.email)
            user.create_time.GetCurrentTime()
            with lock:
                users[user.id] = user
            return user

        def GetUser(self, request, context):
            self._tag(context)
            self._check(request, context)
            with lock:
                user = users.get(request.id)
            if user is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"user {request.id} not found")
            return user

        def ListUsers(self, request, context):
            self._tag(context)
            self._check(request, context)
            with lock:
                return pb.ListUsersResponse(users=list(users.values()))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_UserServiceServicer_to_server(Users(), server)
    port = server.add_insecure_port(args.listen)
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    addr = f"{host}:{port}"
    value = json.dumps({"addr": addr, "zone": "local", "weight": 100, "version": "py-0.1",
                        "metadata": {"lang": "python"}})
    registration = Registration(Etcd(args.etcd), f"{args.prefix}/services/{SERVICE}/{instance}", value, args.ttl)
    registration.register()
    registration.start()
    print(json.dumps({"instance": instance, "addr": addr}), flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    registration.stop()      # watchers drop us first...
    time.sleep(0.2)
    server.stop(grace=5).wait()  # ...then in-flight calls finish
    return 0


if __name__ == "__main__":
    sys.exit(main())
