#!/usr/bin/env bash
# `make interop`: meshkit from the outside, against a running cluster.
#
#   1. the grpcurl and curl lines `make up` prints (and the README shows);
#   2. a Python grpcio client generated from proto/;
#   3. a grpc-web client (Connect's grpc-web transport on Node.js);
#   4. a Java client generated from proto/ and built with plain javac
#      against Debian's jars;
#   5. a Python server joining the mesh by the registry contract: the gateway's
#      balanced channel sends it calls, and it leaves cleanly on SIGTERM;
#   6. Prometheus, 7. the scheduler;
#   8. grpc-go and grpc-java calling xds:///meshkit.user.v1.UserService with the
#      bootstrap `make up` wrote: balanced over every user-service instance.
#
#   interop.sh                against the `make up` cluster (ports from the
#                             MESHKIT_* variables cluster.sh reads)
#   interop.sh --own-cluster  start a cluster of debug binaries on free ports
#                             in a temp dir, run, stop it (what `make test` does)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLIENTS="$ROOT/services/integration-tests/clients"

# N distinct free loopback ports for the cluster's listeners, from below the
# kernel's ephemeral range: a port found by binding to 0 can be taken by an
# outgoing connection, or by a service cluster.sh starts on such a port,
# before the listener it was meant for binds it.
free_ports() {
    python3 - "$1" <<'PY'
import random, socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ports = []
while len(ports) < int(sys.argv[1]):
    port = random.randrange(10000, low) if low > 12000 else 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        port = s.getsockname()[1]
    if port not in ports:
        ports.append(port)
print(*ports)
PY
}

OWN_CLUSTER=0
PY_SERVER_PID=""
WORK="$(mktemp -d /tmp/meshkit-interop-work.XXXXXX)"
cleanup() {
    [[ -n "$PY_SERVER_PID" ]] && kill "$PY_SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
    if (( OWN_CLUSTER )); then
        "$ROOT/deploy/local/cluster.sh" down >/dev/null 2>&1 || true
        rm -rf "$MESHKIT_RUN_DIR"
    fi
}
trap cleanup EXIT

if [[ "${1:-}" == "--own-cluster" ]]; then
    OWN_CLUSTER=1
    MESHKIT_RUN_DIR="$(mktemp -d /tmp/meshkit-interop.XXXXXX)"
    export MESHKIT_RUN_DIR MESHKIT_PROFILE="${MESHKIT_PROFILE:-dev}"
    read -r MESHKIT_ETCD_PORT MESHKIT_ETCD_PEER_PORT MESHKIT_KAFKA_PORT MESHKIT_GATEWAY_PORT \
        MESHKIT_PROMETHEUS_PORT MESHKIT_XDS_PORT MESHKIT_CONSOLE_PORT < <(free_ports 7)
    export MESHKIT_ETCD_PORT MESHKIT_ETCD_PEER_PORT MESHKIT_KAFKA_PORT MESHKIT_GATEWAY_PORT \
        MESHKIT_PROMETHEUS_PORT MESHKIT_XDS_PORT MESHKIT_CONSOLE_PORT
    unset MESHKIT_ETCD_ENDPOINTS MESHKIT_EVENTS_BROKERS
    "$ROOT/deploy/local/cluster.sh" up >"$WORK/cluster.log" 2>&1 \
        || { echo "interop: the cluster did not start:" >&2; tail -20 "$WORK/cluster.log" >&2; exit 1; }
fi

GW="127.0.0.1:${MESHKIT_GATEWAY_PORT:-8080}"
ETCD="${MESHKIT_ETCD_ENDPOINTS:-127.0.0.1:${MESHKIT_ETCD_PORT:-2379}}"
ETCD="${ETCD%%,*}"

passed=0
failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
json() { python3 -c "import sys, json; d = json.load(sys.stdin); print($1)"; }
run_id="$(date +%s%N)"

# 1. The lines `make up` prints.
if out="$(grpcurl -plaintext "$GW" list 2>&1)" \
    && grep -q meshkit.user.v1.UserService <<<"$out" && grep -q meshkit.order.v1.OrderService <<<"$out" \
    && grep -q meshkit.notification.v1.NotificationService <<<"$out"; then
    ok "grpcurl list through the gateway"
else
    fail "grpcurl list through the gateway" "$out"
fi
user_id=""
if out="$(grpcurl -plaintext -d "{\"name\":\"Ada\",\"email\":\"ada-$run_id@example.com\"}" "$GW" meshkit.user.v1.UserService/CreateUser 2>&1)" \
    && user_id="$(json 'd["id"]' <<<"$out")"; then
    ok "grpcurl CreateUser"
else
    fail "grpcurl CreateUser" "$out"
fi
if out="$(grpcurl -plaintext -d "{\"userId\":\"$user_id\",\"items\":[{\"sku\":\"book-1\",\"quantity\":2}]}" "$GW" meshkit.order.v1.OrderService/CreateOrder 2>&1)" \
    && [[ "$(json 'd["status"]' <<<"$out")" == ORDER_STATUS_PENDING ]]; then
    order_id="$(json 'd["id"]' <<<"$out")"
    ok "grpcurl CreateOrder"
else
    fail "grpcurl CreateOrder" "$out"
fi
seen=0
for _ in $(seq 1 50); do
    out="$(grpcurl -plaintext -d "{\"userId\":\"$user_id\"}" "$GW" meshkit.notification.v1.NotificationService/ListNotifications 2>&1 || true)"
    if grep -q '"message"' <<<"$out"; then seen=1; break; fi
    sleep 0.2
done
(( seen )) && ok "grpcurl ListNotifications (the order's event arrived)" || fail "grpcurl ListNotifications" "$out"
if out="$(curl -sf -X POST "http://$GW/v1/users" -H 'content-type: application/json' -d "{\"name\":\"Bo\",\"email\":\"bo-$run_id@example.com\"}")" \
    && bo="$(json 'd["id"]' <<<"$out")" \
    && curl -sf "http://$GW/v1/users/$bo/orders?page_size=10" >/dev/null \
    && curl -sf "http://$GW/openapi.json" | json 'd["openapi"]' | grep -q '^3\.1'; then
    ok "curl REST and /openapi.json"
else
    fail "curl REST and /openapi.json" "${out:-no answer}"
fi

# 2. Python grpcio.
if out="$(python3 "$CLIENTS/python/client.py" --target "$GW" --proto-dir "$ROOT/proto" --email "py-$run_id@example.com" 2>&1)" \
    && [[ "$(json 'd["missing_user"]' <<<"$out")" == NOT_FOUND ]]; then
    ok "Python grpcio client"
else
    fail "Python grpcio client" "$out"
fi

# 3. grpc-web from Node.js.
if out="$(protoc --include_imports --descriptor_set_out="$WORK/meshkit.binpb" -I "$ROOT/proto" \
        meshkit/user/v1/user.proto meshkit/order/v1/order.proto 2>&1)" \
    && out="$(node "$CLIENTS/grpc-web/client.mjs" --base-url "http://$GW" --descriptors "$WORK/meshkit.binpb" --email "web-$run_id@example.com" 2>&1)" \
    && [[ "$(json 'd["missing_user"]' <<<"$out")" == NOT_FOUND ]]; then
    ok "grpc-web client (Node.js)"
else
    fail "grpc-web client (Node.js)" "$out"
fi

# 4. Java, built with javac against Debian's jars.
if out="$("$CLIENTS/java/build.sh" "$WORK/java" 2>&1)" \
    && out="$(java -cp "$(cat "$WORK/java/classpath")" io.meshkit.interop.Client "$GW" "java-$run_id@example.com" 2>&1 | tail -1)" \
    && [[ "$(json 'd["order_status"]' <<<"$out")" == ORDER_STATUS_PENDING ]]; then
    ok "Java client (grpc-java, javac)"
else
    fail "Java client (grpc-java, javac)" "$out"
fi

# 4b. The same client from the Maven build (grpc-java from Maven Central, stubs
# from meshkit-contracts), as Java teams build it.
mvn_jar="$CLIENTS/java/target/meshkit-java-clients-0.1.0.jar"
out=""
if [[ -f "$mvn_jar" ]] \
    && out="$(java -cp "$mvn_jar:$(cat "$CLIENTS/java/target/classpath")" io.meshkit.interop.Client "$GW" "java-mvn-$run_id@example.com" 2>&1 | tail -1)" \
    && [[ "$(json 'd["order_status"]' <<<"$out")" == ORDER_STATUS_PENDING ]]; then
    ok "Java client (grpc-java, Maven)"
else
    fail "Java client (grpc-java, Maven)" "${out:-not built: deploy/local/install-deps.sh --test builds it}"
fi

# 4c. A Java consumer (kafka-clients, a group of its own) reads the order's
# OrderCreated off the topic and decodes it with meshkit-contracts' classes.
kafka="${MESHKIT_EVENTS_BROKERS:-127.0.0.1:${MESHKIT_KAFKA_PORT:-9092}}"
kafka="${kafka%%,*}"
out=""
if [[ -f "$mvn_jar" && -n "${order_id:-}" ]] \
    && out="$(java -cp "$mvn_jar:$(cat "$CLIENTS/java/target/classpath")" io.meshkit.events.Peer \
                consume "$kafka" "${MESHKIT_EVENTS_TOPIC_PREFIX:-}order-events" "interop-$run_id" 0 8 2>&1)" \
    && grep -q "\"order_id\":\"$order_id\"" <<<"$out"; then
    ok "Java consumer (kafka-clients) read the order's OrderCreated"
else
    fail "Java consumer (kafka-clients)" "${out:-no order id, or the Java clients are not built}"
fi

# 5. A Python instance joins the user pool, is called, and leaves.
instance="py-interop-$run_id"
python3 "$CLIENTS/python/server.py" --etcd "$ETCD" --instance "$instance" --proto-dir "$ROOT/proto" >"$WORK/py-server.log" 2>&1 &
PY_SERVER_PID=$!
served=0
for _ in $(seq 1 100); do
    if grpcurl -plaintext -v -d '{"page_size":1}' "$GW" meshkit.user.v1.UserService/ListUsers 2>/dev/null \
        | grep -qi "^x-meshkit-instance: $instance"; then served=1; break; fi
    sleep 0.1
done
key="/meshkit/services/meshkit.user.v1.UserService/$instance"
kill -TERM "$PY_SERVER_PID"
wait "$PY_SERVER_PID" 2>/dev/null || true
PY_SERVER_PID=""
gone=0
for _ in $(seq 1 40); do
    [[ -z "$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD" get "$key" --keys-only 2>/dev/null)" ]] && { gone=1; break; }
    sleep 0.05
done
if (( served && gone )); then
    ok "a Python instance joins the mesh by the registry contract and leaves on SIGTERM"
else
    fail "a Python instance joins the mesh" "served=$served deregistered=$gone; $(tail -5 "$WORK/py-server.log")"
fi

# 6. Prometheus (started by the cluster when installed) scrapes every
# process it found through the registry, and sees the calls made above.
PROM="127.0.0.1:${MESHKIT_PROMETHEUS_PORT:-9091}"
if command -v prometheus >/dev/null; then
    # Processes, not keys: one process registers every service it serves.
    want="$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD" get --prefix /meshkit/services/ --keys-only 2>/dev/null | sed 's#.*/##' | grep . | sort -u | grep -c . || true)"
    up="" calls=""
    for _ in $(seq 1 100); do
        up="$(curl -sf "http://$PROM/api/v1/query" --data-urlencode 'query=count(up{job="meshkit"} == 1)' | json 'd["data"]["result"][0]["value"][1]' 2>/dev/null || true)"
        calls="$(curl -sf "http://$PROM/api/v1/query" --data-urlencode 'query=sum(meshkit_server_requests_total{method="/meshkit.order.v1.OrderService/CreateOrder"})' | json 'd["data"]["result"][0]["value"][1]' 2>/dev/null || true)"
        [[ "$up" == "$want" && -n "$calls" && "$calls" != 0 ]] && break
        sleep 0.2
    done
    if [[ "$up" == "$want" && -n "$calls" && "$calls" != 0 ]]; then
        ok "Prometheus scrapes all $want registered processes (targets from the registry)"
    else
        fail "Prometheus scrapes every process" "up=$up of $want, CreateOrder calls=$calls"
    fi
fi

# 7. The scheduler: a leader is elected, and the reference job triggered over
# REST through the gateway runs on order-service and lands in the job log.
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN_DIR="$TARGET_DIR/${MESHKIT_PROFILE:-dev}"
[[ "${MESHKIT_PROFILE:-dev}" == "dev" ]] && BIN_DIR="$TARGET_DIR/debug"
out="$(curl -s -X POST "http://$GW/v1/jobs/cancel-unpaid-orders:trigger" -H 'content-type: application/json' -d '{}' 2>&1 || true)"
if [[ "$out" == *runIds* ]]; then
    status=""
    for _ in $(seq 1 100); do
        status="$(curl -sf "http://$GW/v1/jobs/cancel-unpaid-orders/runs?page_size=1" | json 'd["runs"][0]["status"]' 2>/dev/null || true)"
        [[ "$status" == RUN_STATUS_SUCCEEDED ]] && break
        sleep 0.1
    done
    leader="$("$BIN_DIR/meshctl" --etcd "$ETCD" jobs list 2>&1 | head -1)"
    if [[ "$status" == RUN_STATUS_SUCCEEDED && "$leader" == "leader: scheduler-"* ]]; then
        ok "scheduler: a trigger over REST ran cancel-unpaid-orders on order-service ($leader)"
    else
        fail "scheduler" "status=$status $leader"
    fi
else
    fail "scheduler trigger over REST" "$out"
fi

# 8. gRPC's own xDS clients over the registry: calls spread over every user-service instance.
bootstrap="${MESHKIT_RUN_DIR:-$ROOT/.run}/xds-bootstrap.json"
users="$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD" get --prefix /meshkit/services/meshkit.user.v1.UserService/ --keys-only 2>/dev/null | grep -c . || true)"
xds_check() { # name command…: 150 calls at 50/s, every one answered, by every instance
    local name="$1" out; shift
    if [[ ! -f "$bootstrap" ]]; then fail "$name" "no $bootstrap: start the cluster with make up"; return; fi
    # Calls start once the channel is READY (a cold JVM resolving xDS on a busy
    # machine can take longer than a call's deadline); the failure shows the
    # first calls that failed, with their start times.
    if GRPC_XDS_BOOTSTRAP="$bootstrap" "$@" --user-id "$user_id" --rate 50 --seconds 3 --ready-timeout-ms 30000 \
            >"$WORK/xds.out" 2>"$WORK/xds.err" && out="$(tail -1 "$WORK/xds.out")" \
        && [[ "$(json 'd["ok"] == d["calls"] and d["calls"] > 0' <<<"$out")" == True ]] \
        && [[ "$(json 'len(d["by_instance"])' <<<"$out")" == "$users" ]]; then
        ok "$name over xDS: $(json '", ".join(f"{k} {v}" for k, v in d["by_instance"].items())' <<<"$out") (READY after $(grep -m1 '"event":"ready"' "$WORK/xds.out" | json 'd["ms"]') ms)"
    else
        fail "$name over xDS" "$(tail -1 "$WORK/xds.out") $(grep -v '"code":"OK"' "$WORK/xds.out" | grep -m3 '"code"') $(tail -3 "$WORK/xds.err")"
    fi
}
go_client="${CARGO_TARGET_DIR:-$ROOT/target}/tools/xds-client-go"
if [[ -x "$go_client" ]]; then xds_check "grpc-go" "$go_client"
else fail "grpc-go over xDS" "not built: deploy/local/install-deps.sh --test builds it"; fi
if [[ -f "$mvn_jar" ]]; then xds_check "grpc-java" java -cp "$mvn_jar:$(cat "$CLIENTS/java/target/classpath")" io.meshkit.xds.Client
else fail "grpc-java over xDS" "not built: deploy/local/install-deps.sh --test builds it"; fi

echo "interop: $passed passed, $failed failed"
(( failed == 0 ))
