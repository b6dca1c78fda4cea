#!/usr/bin/env bash
# The local cluster behind `make up` / `make down` / `make status`: etcd,
# Apache Kafka (one KRaft node, durable under the run directory), two instances each of
# user-service, order-service, notification-service and scheduler-service
# (with order-service's cancel-unpaid-orders job), the gateway on
# 127.0.0.1:8080, the xDS server on 127.0.0.1:18000 (its client bootstrap in
# $RUN_DIR/xds-bootstrap.json) and the console on 127.0.0.1:8090, as plain
# processes with pid files and logs under one run directory.
#
#   MESHKIT_RUN_DIR         run directory (default: .run in the repository)
#   MESHKIT_ETCD_ENDPOINTS  use this etcd instead of starting one on 127.0.0.1:2379
#   MESHKIT_ETCD_MEMBERS    1 (default), or 3: a 3-member etcd cluster with clients on
#                           127.0.0.1:2379, 2381 and 2383 (peers on 2380, 2382, 2384),
#                           from target/tools/etcd (the version the deploy files ship,
#                           which install-deps.sh builds when Go is installed) when
#                           there, else Debian's etcd
#   MESHKIT_EVENTS_BROKERS  use this Kafka instead of starting one on 127.0.0.1:9092
#   MESHKIT_KAFKA_HEAP      the local broker's heap ceiling (default: 512m)
#   MESHKIT_GATEWAY_PORT    the gateway's port (default: 8080)
#   MESHKIT_XDS_PORT        the xDS server's port (default: 18000)
#   MESHKIT_CONSOLE_PORT    the console's port (default: 8090)
#   MESHKIT_CONSOLE_ADMIN_PASSWORD  the console's admin password (default: one made
#                           once, kept in $RUN_DIR/console-admin-password)
#   MESHKIT_PROMETHEUS_PORT Prometheus's port (default: 9091; started when installed)
#   MESHKIT_PROFILE         cargo profile of the binaries (default: dev, as `make up` builds)
#   MESHKIT_TLS             1: mTLS between every process, HTTPS at the gateway, TLS with
#                           client certificates at the Kafka broker, with a development
#                           CA and certificates made under $RUN_DIR/tls
#   MESHKIT_JAVA            1: PostgreSQL (on MESHKIT_POSTGRES_PORT, default 15432, data in
#                           $RUN_DIR/postgres, or in the postgres user's home when that
#                           user cannot reach the run directory) for user-service, and two instances of the
#                           Spring Boot UserService (services/user-spring) beside the Rust
#                           ones on the same tables: one service, two languages
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_DIR="${MESHKIT_RUN_DIR:-$ROOT/.run}"
PROFILE="${MESHKIT_PROFILE:-dev}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN_DIR="$TARGET_DIR/$PROFILE"
[[ "$PROFILE" == "dev" ]] && BIN_DIR="$TARGET_DIR/debug"
ETCD_CLIENT_PORT="${MESHKIT_ETCD_PORT:-2379}"
ETCD_PEER_PORT="${MESHKIT_ETCD_PEER_PORT:-2380}"
KAFKA_PORT="${MESHKIT_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${MESHKIT_KAFKA_CONTROLLER_PORT:-9093}"
GATEWAY_PORT="${MESHKIT_GATEWAY_PORT:-8080}"
PROMETHEUS_PORT="${MESHKIT_PROMETHEUS_PORT:-9091}"
XDS_PORT="${MESHKIT_XDS_PORT:-18000}"
CONSOLE_PORT="${MESHKIT_CONSOLE_PORT:-8090}"
POSTGRES_PORT="${MESHKIT_POSTGRES_PORT:-15432}"
JAVA_ON=0
[[ "${MESHKIT_JAVA:-0}" == 1 ]] && JAVA_ON=1
SERVICES=(user user order order notification notification scheduler scheduler)
KAFKA="$ROOT/deploy/local/kafka.sh"
# The topics `make up` creates (compose and Kubernetes create the same; see
# docs/EVENTS.md): partitions, and retention in milliseconds.
TOPICS=("order-events 6 604800000" "order-events.dlq 6 2592000000")

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ETCD_MEMBERS="${MESHKIT_ETCD_MEMBERS:-1}"
case "$ETCD_MEMBERS" in 1 | 3) ;; *) echo "MESHKIT_ETCD_MEMBERS must be 1 or 3, not '$ETCD_MEMBERS'" >&2; exit 2 ;; esac

# Member i of a 3-member cluster: clients on base+2i, peers on base+2i+1.
etcd_member_port() { echo $(( ETCD_CLIENT_PORT + 2 * $1 )); }

etcd_endpoints() {
    if [[ -n "${MESHKIT_ETCD_ENDPOINTS:-}" ]]; then echo "$MESHKIT_ETCD_ENDPOINTS"; return; fi
    if (( ETCD_MEMBERS == 1 )); then echo "127.0.0.1:$ETCD_CLIENT_PORT"; return; fi
    local i list=()
    for i in 0 1 2; do list+=("127.0.0.1:$(etcd_member_port "$i")"); done
    (IFS=,; echo "${list[*]}")
}

kafka_brokers() { echo "${MESHKIT_EVENTS_BROKERS:-127.0.0.1:$KAFKA_PORT}"; }

registered_count() {
    # etcdctl 3.4 has no --count-only: count the keys.
    ETCDCTL_API=3 etcdctl --endpoints "$(etcd_endpoints)" --command-timeout=2s \
        get --prefix /meshkit/services/ --keys-only 2>/dev/null | grep -c . || true
}

running() {
    local any=0
    for f in "$RUN_DIR"/pids/*.pid; do
        [[ -e "$f" ]] || continue
        pid_alive "$f" && any=1
    done
    (( any ))
}

start_etcd_cluster() {
    local bin=etcd i
    [[ -x "$TARGET_DIR/tools/etcd" ]] && bin="$TARGET_DIR/tools/etcd"
    local initial=()
    for i in 0 1 2; do initial+=("m$i=http://127.0.0.1:$(( $(etcd_member_port "$i") + 1 ))"); done
    for i in 0 1 2; do
        local port; port="$(etcd_member_port "$i")"
        if port_open "$port" || port_open $(( port + 1 )); then
            echo "port $port or $(( port + 1 )) is taken by another process; stop it or set MESHKIT_ETCD_ENDPOINTS" >&2
            exit 1
        fi
        local client="http://127.0.0.1:$port" peer="http://127.0.0.1:$(( port + 1 ))"
        # A member's data outlives `make down`; an existing member rejoins with it.
        local state=new
        [[ -d "$RUN_DIR/etcd-$i/member" ]] && state=existing
        setsid "$bin" --name "m$i" --data-dir "$RUN_DIR/etcd-$i" \
            --listen-client-urls "$client" --advertise-client-urls "$client" \
            --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
            --initial-cluster "$(IFS=,; echo "${initial[*]}")" --initial-cluster-state "$state" \
            --initial-cluster-token meshkit-local --logger zap --log-level warn \
            </dev/null >"$RUN_DIR/logs/etcd-$i.log" 2>&1 &
        echo $! >"$RUN_DIR/pids/etcd-$i.pid"
    done
    for _ in $(seq 1 150); do
        ETCDCTL_API=3 etcdctl --endpoints "$(etcd_endpoints)" --command-timeout=1s endpoint health >/dev/null 2>&1 && {
            echo "etcd:      3 members ($("$bin" --version | head -1)), $(etcd_endpoints) (data in $RUN_DIR/etcd-0..2)"
            return
        }
        sleep 0.1
    done
    echo "the etcd cluster did not start; see $RUN_DIR/logs/etcd-*.log" >&2
    tail -3 "$RUN_DIR"/logs/etcd-*.log >&2 || true
    exit 1
}

start_etcd() {
    if [[ -n "${MESHKIT_ETCD_ENDPOINTS:-}" ]]; then
        echo "etcd:      using $MESHKIT_ETCD_ENDPOINTS"
        return
    fi
    if (( ETCD_MEMBERS == 3 )); then
        start_etcd_cluster
        return
    fi
    if port_open "$ETCD_CLIENT_PORT"; then
        echo "port $ETCD_CLIENT_PORT is taken by another process; stop it or set MESHKIT_ETCD_ENDPOINTS" >&2
        exit 1
    fi
    local client="http://127.0.0.1:$ETCD_CLIENT_PORT" peer="http://127.0.0.1:$ETCD_PEER_PORT"
    setsid etcd --name meshkit-local --data-dir "$RUN_DIR/etcd" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "meshkit-local=$peer" \
        --heartbeat-interval 100 --election-timeout 500 \
        --logger zap --log-level warn \
        </dev/null >"$RUN_DIR/logs/etcd.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/etcd.pid"
    for _ in $(seq 1 100); do
        ETCDCTL_API=3 etcdctl --endpoints "$client" --command-timeout=1s endpoint health >/dev/null 2>&1 && {
            echo "etcd:      $client (data in $RUN_DIR/etcd)"
            return
        }
        pid_alive "$RUN_DIR/pids/etcd.pid" || break
        sleep 0.1
    done
    echo "etcd did not start; see $RUN_DIR/logs/etcd.log" >&2
    tail -5 "$RUN_DIR/logs/etcd.log" >&2 || true
    exit 1
}

wait_listening() { # name port [seconds]: until the process listens (10 s), or fail showing its log
    local name="$1" port="$2" secs="${3:-10}"
    for _ in $(seq 1 $(( secs * 10 ))); do
        port_open "$port" && return 0
        pid_alive "$RUN_DIR/pids/$name.pid" || break
        sleep 0.1
    done
    echo "$name did not start; the end of $RUN_DIR/logs/$name.log:" >&2
    tail -20 "$RUN_DIR/logs/$name.log" >&2 || true
    return 1
}

start_broker() {
    if [[ -n "${MESHKIT_EVENTS_BROKERS:-}" ]]; then
        echo "kafka:     using $MESHKIT_EVENTS_BROKERS"
        return
    fi
    if port_open "$KAFKA_PORT"; then
        echo "port $KAFKA_PORT is taken by another process; stop it or set MESHKIT_EVENTS_BROKERS" >&2
        exit 1
    fi
    if port_open "$KAFKA_CONTROLLER_PORT"; then
        echo "port $KAFKA_CONTROLLER_PORT (Kafka's controller) is taken; stop that process or set MESHKIT_KAFKA_CONTROLLER_PORT" >&2
        exit 1
    fi
    local t0=$SECONDS tls=()
    # With MESHKIT_TLS=1 the broker's one client listener is TLS and asks for
    # a certificate of the development CA; the brokers' own traffic uses it too.
    tls_on && tls=(
        MESHKIT_KAFKA_TLS_CA="$RUN_DIR/tls/ca.pem" MESHKIT_KAFKA_TLS_CERT="$RUN_DIR/tls/kafka.pem"
        MESHKIT_KAFKA_TLS_KEY="$RUN_DIR/tls/kafka.key" MESHKIT_KAFKA_CLIENT_AUTH=required
    )
    # kafka.sh formats the storage on first use, then execs the JVM.
    env "${tls[@]}" setsid "$KAFKA" run "$RUN_DIR/kafka" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" \
        </dev/null >"$RUN_DIR/logs/kafka.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/kafka.pid"
    wait_listening kafka "$KAFKA_PORT" 60 || exit 1
    create_topics || exit 1
    echo "kafka:     127.0.0.1:$KAFKA_PORT (Apache Kafka $("$KAFKA" version)$(tls_on && echo ", TLS"), data in $RUN_DIR/kafka, up in $((SECONDS - t0)) s)"
}

# The topics, unless they exist: stated partitions, replication 1 (one
# node), retention; meshkit would create missing ones at start, but with the
# broker's default retention.
create_topics() {
    local existing spec name partitions retention
    # admin.properties: what Kafka's tools need to reach this broker (TLS, its certificate).
    local admin=(--bootstrap-server "127.0.0.1:$KAFKA_PORT" --command-config "$RUN_DIR/kafka/admin.properties")
    existing="$("$KAFKA" topics "${admin[@]}" --list 2>>"$RUN_DIR/logs/kafka.log")" \
        || { echo "kafka: listing topics failed; see $RUN_DIR/logs/kafka.log" >&2; return 1; }
    for spec in "${TOPICS[@]}"; do
        read -r name partitions retention <<<"$spec"
        grep -qx "$name" <<<"$existing" && continue
        "$KAFKA" topics "${admin[@]}" --create --if-not-exists --topic "$name" \
            --partitions "$partitions" --replication-factor 1 --config "retention.ms=$retention" \
            >>"$RUN_DIR/logs/kafka.log" 2>&1 \
            || { echo "kafka: creating topic $name failed; see $RUN_DIR/logs/kafka.log" >&2; return 1; }
    done
}

# A run directory from before Apache Kafka held a Tansu broker's SQLite log,
# which Kafka cannot read, and offsets into it that would not match Kafka's:
# set the whole directory aside (nothing is deleted) and start afresh.
migrate_run_dir() {
    [[ -f "$RUN_DIR/kafka/tansu.db" ]] || return 0
    local old
    old="$RUN_DIR.tansu-$(date +%Y%m%d%H%M%S)"
    mv "$RUN_DIR" "$old"
    echo "make up: $RUN_DIR held a cluster of the Tansu broker days (its events and offsets do not carry over to Apache Kafka);"
    echo "         moved it to $old, starting afresh (delete that directory when you no longer need its data)"
}

tls_on() { [[ "${MESHKIT_TLS:-0}" == 1 ]]; }

# A development CA (made once) and a certificate per process, each with the
# identity spiffe://meshkit/NAME; issued again at every start (a rotation).
make_certs() {
    tls_on || return 0
    "$BIN_DIR/meshctl" certs --dir "$RUN_DIR/tls" --days 30 \
        user-service order-service notification-service scheduler-service gateway meshctl kafka \
        xds-server xds-client console >/dev/null
    echo "tls:       mTLS on; CA and certificates in $RUN_DIR/tls"
}

tls_env() { # name: the MESHKIT_TLS_* variables for its certificate
    tls_on || return 0
    echo "MESHKIT_TLS_ENABLED=true MESHKIT_TLS_CERT_FILE=$RUN_DIR/tls/$1.pem MESHKIT_TLS_KEY_FILE=$RUN_DIR/tls/$1.key MESHKIT_TLS_CA_FILE=$RUN_DIR/tls/ca.pem"
}

events_tls_env() { # name: the MESHKIT_EVENTS_TLS_* variables, the broker our own unless given
    tls_on && [[ -z "${MESHKIT_EVENTS_BROKERS:-}" ]] || return 0
    echo "MESHKIT_EVENTS_TLS_CA_FILE=$RUN_DIR/tls/ca.pem MESHKIT_EVENTS_TLS_CERT_FILE=$RUN_DIR/tls/$1.pem MESHKIT_EVENTS_TLS_KEY_FILE=$RUN_DIR/tls/$1.key"
}

# PostgreSQL for the Rust and the Spring UserService (MESHKIT_JAVA=1). It
# refuses to run as root, so as root it runs as the `postgres` user.
pg_run() {
    local bin; bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$bin/$1" "${@:2}"; else "$bin/$1" "${@:2}"; fi
}
postgres_url() { echo "postgres://postgres@127.0.0.1:$POSTGRES_PORT/postgres"; }

# Under the run directory, unless the `postgres` user (root runs the server
# as it) cannot reach it, as under /root: then in that user's home, one
# folder per run directory.
pg_data_dir() {
    if [[ "$(id -u)" != 0 ]] || runuser -u postgres -- test -x "$RUN_DIR" 2>/dev/null; then
        echo "$RUN_DIR/postgres"
    else
        echo "$(getent passwd postgres | cut -d: -f6)/meshkit/$(printf %s "$RUN_DIR" | md5sum | cut -c1-12)"
    fi
}

start_postgres() {
    local data; data="$(pg_data_dir)"
    if port_open "$POSTGRES_PORT"; then
        echo "port $POSTGRES_PORT is taken by another process; stop it or set MESHKIT_POSTGRES_PORT" >&2
        exit 1
    fi
    if [[ ! -f "$data/PG_VERSION" ]]; then
        mkdir -p "$data"
        if [[ "$(id -u)" == 0 ]]; then chown postgres "$data"; fi
        pg_run initdb -D "$data" -A trust -U postgres -E UTF8 >"$RUN_DIR/logs/postgres-init.log" 2>&1 \
            || { echo "initdb failed; see $RUN_DIR/logs/postgres-init.log" >&2; exit 1; }
    fi
    # The server writes its log itself, where it may; the run's logs link to it.
    pg_run pg_ctl -D "$data" -l "$data/postgres.log" -w -t 30 \
        -o "-p $POSTGRES_PORT -k $data -c listen_addresses=127.0.0.1" start >/dev/null \
        || { echo "PostgreSQL did not start; see $data/postgres.log" >&2; exit 1; }
    ln -sf "$data/postgres.log" "$RUN_DIR/logs/postgres.log"
    head -1 "$data/postmaster.pid" >"$RUN_DIR/pids/postgres.pid"
    echo "postgres:  $(postgres_url) (user-service's tables, shared by the Spring instances)"
}

stop_postgres() {
    local data; data="$(pg_data_dir)"
    [[ -f "$data/postmaster.pid" ]] || return 0
    pg_run pg_ctl -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    rm -f "$RUN_DIR/pids/postgres.pid"
}

# The Spring Boot UserService, from the Maven build install-deps.sh runs
# with MESHKIT_JAVA=1, on the same environment variables as the Rust one.
start_user_spring() { # slot
    local slot="$1" port target="$ROOT/services/user-spring/target"
    port="$(free_port)"
    MESHKIT_ETCD_ENDPOINTS="$(etcd_endpoints)" \
    MESHKIT_SERVER_LISTEN="127.0.0.1:$port" \
    MESHKIT_REGISTRY_INSTANCE_ID="user-spring-$slot" \
    MESHKIT_DATABASE_URL="$(postgres_url)" \
        setsid java -Xmx256m -XX:+UseSerialGC -cp "$target/meshkit-user-spring-0.1.0.jar:$(cat "$target/classpath")" \
        io.meshkit.user.UserApplication </dev/null >"$RUN_DIR/logs/user-spring-$slot.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/user-spring-$slot.pid"
    echo "$port" >"$RUN_DIR/ports/user-spring-$slot"
}

instance_registered() { # service instance-id
    ETCDCTL_API=3 etcdctl --endpoints "$(etcd_endpoints)" --command-timeout=2s \
        get "/meshkit/services/$1/$2" --keys-only 2>/dev/null | grep -q .
}

# Waits until `want` instance keys are registered (or, given a service and
# instance ids, those instances), failing with the log of a process that
# exited meanwhile.
wait_registered() { # want seconds [service id…]
    local want="$1" secs="$2" service="${3:-}" ids=("${@:4}")
    for _ in $(seq 1 $(( secs * 20 ))); do
        if [[ -n "$service" ]]; then
            local all=1 id
            for id in "${ids[@]}"; do instance_registered "$service" "$id" || { all=0; break; }; done
            (( all )) && return 0
        elif [[ "$(registered_count)" -ge "$want" ]]; then
            return 0
        fi
        for f in "$RUN_DIR"/pids/*.pid; do
            if ! pid_alive "$f"; then
                local n; n="$(basename "$f" .pid)"
                echo "$n exited during start; its log:" >&2
                tail -20 "$RUN_DIR/logs/$n.log" >&2 || true
                cmd_down >/dev/null
                exit 1
            fi
        done
        sleep 0.05
    done
    echo "the cluster did not register within $secs s; logs are in $RUN_DIR/logs" >&2
    cmd_down >/dev/null
    exit 1
}

start_service() { # name slot
    local name="$1" slot="$2" port db="${MESHKIT_DATABASE_URL:-sqlite://$RUN_DIR/data/$name.db?mode=rwc}"
    (( JAVA_ON )) && [[ "$name" == user ]] && db="$(postgres_url)"
    port="$(free_port)"
    env $(tls_env "$name-service") $(events_tls_env "$name-service") \
    MESHKIT_ETCD_ENDPOINTS="$(etcd_endpoints)" \
    MESHKIT_EVENTS_BROKERS="$(kafka_brokers)" \
    MESHKIT_SERVER_LISTEN="127.0.0.1:$port" \
    MESHKIT_REGISTRY_INSTANCE_ID="$name-$slot" \
    MESHKIT_DATABASE_URL="$db" \
        setsid "$BIN_DIR/$name-service" </dev/null >"$RUN_DIR/logs/$name-$slot.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/$name-$slot.pid"
    echo "$port" >"$RUN_DIR/ports/$name-$slot"
}

start_gateway() {
    if port_open "$GATEWAY_PORT"; then
        echo "port $GATEWAY_PORT is taken by another process; stop it or set MESHKIT_GATEWAY_PORT" >&2
        cmd_down >/dev/null
        exit 1
    fi
    local edge=()
    tls_on && edge=(MESHKIT_GATEWAY_TLS_CERT_FILE="$RUN_DIR/tls/gateway.pem" MESHKIT_GATEWAY_TLS_KEY_FILE="$RUN_DIR/tls/gateway.key")
    env $(tls_env gateway) "${edge[@]}" \
    MESHKIT_ETCD_ENDPOINTS="$(etcd_endpoints)" \
    MESHKIT_GATEWAY_LISTEN="127.0.0.1:$GATEWAY_PORT" \
    MESHKIT_REGISTRY_INSTANCE_ID=gateway-1 \
    MESHKIT_GATEWAY_CORS_ORIGINS="${MESHKIT_GATEWAY_CORS_ORIGINS:-*}" \
        setsid "$BIN_DIR/meshkit-gateway" </dev/null >"$RUN_DIR/logs/gateway.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/gateway.pid"
    echo "$GATEWAY_PORT" >"$RUN_DIR/ports/gateway"
    wait_listening gateway "$GATEWAY_PORT" || { cmd_down >/dev/null; exit 1; }
    if tls_on; then
        echo "gateway:   https://127.0.0.1:$GATEWAY_PORT (REST, grpc-web, gRPC; CA $RUN_DIR/tls/ca.pem)"
    else
        echo "gateway:   http://127.0.0.1:$GATEWAY_PORT (REST, grpc-web, gRPC)"
    fi
}

# The xDS server, and a bootstrap for gRPC's own xDS clients (grpc-java with
# grpc-xds, grpc-go's xds package): GRPC_XDS_BOOTSTRAP=$RUN_DIR/xds-bootstrap.json.
start_xds() {
    if port_open "$XDS_PORT"; then
        echo "port $XDS_PORT is taken by another process; stop it or set MESHKIT_XDS_PORT" >&2
        cmd_down >/dev/null
        exit 1
    fi
    env $(tls_env xds-server) \
    MESHKIT_ETCD_ENDPOINTS="$(etcd_endpoints)" \
    MESHKIT_SERVER_LISTEN="127.0.0.1:$XDS_PORT" \
    MESHKIT_REGISTRY_INSTANCE_ID=xds-1 \
        setsid "$BIN_DIR/xds-server" </dev/null >"$RUN_DIR/logs/xds-1.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/xds-1.pid"
    echo "$XDS_PORT" >"$RUN_DIR/ports/xds-1"
    wait_listening xds-1 "$XDS_PORT" || { cmd_down >/dev/null; exit 1; }
    env $(tls_env xds-client) "$BIN_DIR/meshctl" xds bootstrap --server "127.0.0.1:$XDS_PORT" \
        --node "$(hostname)-client" >"$RUN_DIR/xds-bootstrap.json"
    echo "xds:       127.0.0.1:$XDS_PORT (ADS); GRPC_XDS_BOOTSTRAP=$RUN_DIR/xds-bootstrap.json, target xds:///SERVICE"
}

# The console, signed in as admin with a password made once for this run
# directory (or MESHKIT_CONSOLE_ADMIN_PASSWORD); HTTPS under MESHKIT_TLS=1.
start_console() {
    if port_open "$CONSOLE_PORT"; then
        echo "console:   port $CONSOLE_PORT is taken; the console is not started (set MESHKIT_CONSOLE_PORT)"
        return 0
    fi
    local file="$RUN_DIR/console-admin-password" password="${MESHKIT_CONSOLE_ADMIN_PASSWORD:-}"
    if [[ -z "$password" ]]; then
        if [[ ! -s "$file" ]]; then
            (umask 077; head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$file")
        fi
        password="$(cat "$file")"
    fi
    local edge=() scheme=http
    if tls_on; then
        edge=(MESHKIT_CONSOLE_TLS_CERT_FILE="$RUN_DIR/tls/console.pem" MESHKIT_CONSOLE_TLS_KEY_FILE="$RUN_DIR/tls/console.key")
        scheme=https
    fi
    env $(tls_env console) $(events_tls_env console) "${edge[@]}" \
    MESHKIT_ETCD_ENDPOINTS="$(etcd_endpoints)" \
    MESHKIT_EVENTS_BROKERS="$(kafka_brokers)" \
    MESHKIT_CONSOLE_LISTEN="127.0.0.1:$CONSOLE_PORT" \
    MESHKIT_CONSOLE_ADMIN_PASSWORD="$password" \
        setsid "$BIN_DIR/console" </dev/null >"$RUN_DIR/logs/console.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/console.pid"
    echo "$CONSOLE_PORT" >"$RUN_DIR/ports/console"
    wait_listening console "$CONSOLE_PORT" || { cmd_down >/dev/null; exit 1; }
    if [[ -n "${MESHKIT_CONSOLE_ADMIN_PASSWORD:-}" ]]; then
        echo "console:   $scheme://127.0.0.1:$CONSOLE_PORT (sign in as admin with MESHKIT_CONSOLE_ADMIN_PASSWORD)"
    else
        echo "console:   $scheme://127.0.0.1:$CONSOLE_PORT (sign in as admin; the password is in $file)"
    fi
}

# The reference job, defined in the config center unless it is there already
# (a job changed or paused earlier keeps its settings).
define_jobs() {
    local key=/meshkit/config/scheduler/scheduler.jobs.cancel-unpaid-orders
    if [[ -z "$(ETCDCTL_API=3 etcdctl --endpoints "$(etcd_endpoints)" get "$key" --print-value-only 2>/dev/null)" ]]; then
        "$BIN_DIR/meshctl" --etcd "$(etcd_endpoints)" config set scheduler scheduler.jobs.cancel-unpaid-orders \
            '{"cron":"0 * * * * *","time_zone":"UTC","target":"order","handler":"cancel-unpaid-orders","param":"{\"older_than_secs\":900}","route":"sharding_broadcast","timeout_ms":30000,"retries":1}' >/dev/null
    fi
    echo "jobs:      cancel-unpaid-orders every minute on order-service (meshctl jobs list)"
}

# Scrape targets from the registry (meshctl keeps the file current), and a
# Prometheus that reads them, when Prometheus is installed and its port free.
start_prometheus() {
    mkdir -p "$RUN_DIR/prometheus/sd"
    cp "$ROOT/deploy/prometheus/prometheus.yml" "$RUN_DIR/prometheus/prometheus.yml"
    setsid "$BIN_DIR/meshctl" --etcd "$(etcd_endpoints)" prometheus-sd --watch \
        --out "$RUN_DIR/prometheus/sd/targets.json" </dev/null >"$RUN_DIR/logs/prometheus-sd.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/prometheus-sd.pid"
    if ! command -v prometheus >/dev/null; then
        echo "metrics:   targets in $RUN_DIR/prometheus/sd/targets.json (install prometheus to scrape them)"
        return
    fi
    if port_open "$PROMETHEUS_PORT"; then
        echo "metrics:   port $PROMETHEUS_PORT is taken; Prometheus not started (set MESHKIT_PROMETHEUS_PORT)"
        return
    fi
    setsid prometheus --config.file="$RUN_DIR/prometheus/prometheus.yml" \
        --storage.tsdb.path="$RUN_DIR/prometheus/data" --storage.tsdb.retention.time=2d \
        --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --log.level=warn \
        </dev/null >"$RUN_DIR/logs/prometheus.log" 2>&1 &
    echo $! >"$RUN_DIR/pids/prometheus.pid"
    wait_listening prometheus "$PROMETHEUS_PORT" || return 0
    echo "metrics:   Prometheus http://127.0.0.1:$PROMETHEUS_PORT (every process, found through the registry)"
}

cmd_up() {
    if running; then
        echo "meshkit is already running (run dir $RUN_DIR); \`make down\` stops it."
        cmd_status
        return 0
    fi
    local bin
    for bin in user-service order-service notification-service scheduler-service meshkit-gateway xds-server console meshctl; do
        if [[ ! -x "$BIN_DIR/$bin" ]]; then
            echo "no $BIN_DIR/$bin: \`make up\` builds it (or \`MESHKIT_PROFILE=$PROFILE make build\`)" >&2
            exit 1
        fi
    done
    if (( JAVA_ON )); then
        if tls_on; then
            echo "MESHKIT_JAVA=1 runs without MESHKIT_TLS: the Spring service serves plaintext gRPC" >&2
            exit 2
        fi
        if [[ ! -f "$ROOT/services/user-spring/target/classpath" ]]; then
            echo "the Spring service is not built: MESHKIT_JAVA=1 make up (or deploy/local/install-deps.sh) builds it" >&2
            exit 1
        fi
    fi
    migrate_run_dir
    mkdir -p "$RUN_DIR"/{pids,logs,data,ports}
    rm -f "$RUN_DIR"/pids/*.pid "$RUN_DIR"/ports/*
    local t0=$SECONDS start_ns
    start_ns=$(date +%s%N)
    start_etcd
    make_certs
    start_broker
    (( JAVA_ON )) && start_postgres
    # A user instance first: order-service's first calls find it registered.
    declare -A slot=()
    for name in "${SERVICES[@]}"; do
        slot[$name]=$(( ${slot[$name]:-0} + 1 ))
        start_service "$name" "${slot[$name]}"
    done
    local want=${#SERVICES[@]}
    wait_registered "$want" 10
    if (( JAVA_ON )); then
        # After the Rust user-service: its migrations made the tables.
        start_user_spring 1
        start_user_spring 2
        wait_registered 0 90 meshkit.user.v1.UserService user-spring-1 user-spring-2
        echo "spring:    user-spring-1, user-spring-2 (version spring-1) beside user-1, user-2; \`meshctl split\` moves traffic"
    fi
    define_jobs
    start_gateway
    start_xds
    start_prometheus
    start_console
    local ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
    echo "cluster:   answering ${ms} ms after start ($(( SECONDS - t0 )) s)"
    cmd_status
    local gw="127.0.0.1:$GATEWAY_PORT" user_port
    user_port="$(cat "$RUN_DIR/ports/user-1")"
    # With MESHKIT_TLS=1: HTTPS and mTLS flags in every line.
    local g="-plaintext" http="http" c="" direct="-plaintext" ctl=""
    if tls_on; then
        local t="$RUN_DIR/tls"
        g="-cacert $t/ca.pem" http="https" c="--cacert $t/ca.pem "
        direct="-cacert $t/ca.pem -cert $t/meshctl.pem -key $t/meshctl.key"
        ctl="MESHKIT_TLS_ENABLED=1 MESHKIT_TLS_CERT_FILE=$t/meshctl.pem MESHKIT_TLS_KEY_FILE=$t/meshctl.key MESHKIT_TLS_CA_FILE=$t/ca.pem "
    fi
    cat <<TRY

Try it through the gateway (grpcurl is installed by \`make up\`):
  grpcurl $g $gw list
  grpcurl $g -d '{"name":"Ada","email":"ada@example.com"}' $gw meshkit.user.v1.UserService/CreateUser
  grpcurl $g -d '{"userId":"<id from CreateUser>","items":[{"sku":"book-1","quantity":2}]}' $gw meshkit.order.v1.OrderService/CreateOrder
  grpcurl $g -d '{"userId":"<id from CreateUser>"}' $gw meshkit.notification.v1.NotificationService/ListNotifications
  curl -s ${c}-X POST $http://$gw/v1/users -H 'content-type: application/json' -d '{"name":"Bo","email":"bo@example.com"}'
  curl -s ${c}$http://$gw/v1/users/<id>/orders?page_size=10
  curl -s ${c}$http://$gw/openapi.json
  curl -s ${c}$http://$gw/v1/jobs
  curl -s ${c}-X POST $http://$gw/v1/jobs/cancel-unpaid-orders:trigger -H 'content-type: application/json' -d '{}'
or a service directly:
  grpcurl $direct -d '{"service":"meshkit.user.v1.UserService"}' 127.0.0.1:$user_port grpc.health.v1.Health/Check
  ETCDCTL_API=3 etcdctl --endpoints $(etcd_endpoints) get --prefix /meshkit/services/
  $BIN_DIR/meshctl --etcd $(etcd_endpoints) instances
  $BIN_DIR/meshctl --etcd $(etcd_endpoints) pools order-1
  $BIN_DIR/meshctl --etcd $(etcd_endpoints) events
  MESHKIT_EVENTS_BROKERS=$(kafka_brokers) $(events_tls_env meshctl) $BIN_DIR/meshctl --etcd $(etcd_endpoints) events dead-letters
  ${ctl}$BIN_DIR/meshctl --etcd $(etcd_endpoints) jobs list
  ${ctl}$BIN_DIR/meshctl --etcd $(etcd_endpoints) jobs history cancel-unpaid-orders
  ${ctl}$BIN_DIR/meshctl --etcd $(etcd_endpoints) xds clients
  curl -s http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query --data-urlencode 'query=sum by (method) (meshkit_server_requests_total)'
TRY
    if (( JAVA_ON )); then
        cat <<TRY
The Spring Boot and Rust UserService side by side (docs/MIGRATION.md walks the move):
  $BIN_DIR/meshctl --etcd $(etcd_endpoints) split meshkit.user.v1.UserService spring-1=90 0.1.0=10
  $BIN_DIR/meshctl --etcd $(etcd_endpoints) split meshkit.user.v1.UserService
  curl -si $http://$gw/v1/users/<id> | grep x-meshkit-instance
TRY
    fi
    cat <<TRY

Logs: $RUN_DIR/logs    Stop: make down
TRY
}

cmd_status() {
    printf '%-15s %-8s %-7s %s\n' PROCESS PID STATE ADDRESS
    for f in "$RUN_DIR"/pids/*.pid; do
        [[ -e "$f" ]] || continue
        local n state addr
        n="$(basename "$f" .pid)"
        state=stopped; pid_alive "$f" && state=running
        case "$n" in
            etcd) addr="127.0.0.1:$ETCD_CLIENT_PORT" ;;
            etcd-*) addr="127.0.0.1:$(etcd_member_port "${n#etcd-}")" ;;
            kafka) addr="127.0.0.1:$KAFKA_PORT" ;;
            gateway) addr="127.0.0.1:$GATEWAY_PORT" ;;
            xds-1) addr="127.0.0.1:$XDS_PORT" ;;
            console) addr="127.0.0.1:$CONSOLE_PORT" ;;
            prometheus) addr="127.0.0.1:$PROMETHEUS_PORT" ;;
            prometheus-sd) addr="$RUN_DIR/prometheus/sd/targets.json" ;;
            postgres) addr="127.0.0.1:$POSTGRES_PORT" ;;
            *) addr="127.0.0.1:$(cat "$RUN_DIR/ports/$n" 2>/dev/null)" ;;
        esac
        printf '%-15s %-8s %-7s %s\n' "$n" "$(cat "$f")" "$state" "$addr"
    done
    echo "registered in etcd: $(registered_count) instance keys under /meshkit/services/"
}

stop_pid_file() { # file timeout-seconds
    local f="$1" pid
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 $(( $2 * 20 ))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

# Restarts one service instance as a rolling deploy would: SIGTERM (it goes
# NOT_SERVING, revokes its lease and drains), then the same binary with the
# same settings and instance id on a new port, until it is registered again.
cmd_restart() { # instance: user-1, order-2, notification-1, scheduler-2
    local inst="${1:-}"
    [[ "$inst" =~ ^(user|order|notification|scheduler)-([0-9]+)$ ]] \
        || { echo "restart takes a service instance as \`status\` lists them (user-1, order-2, …), not '$inst'" >&2; exit 2; }
    local name="${BASH_REMATCH[1]}" slot="${BASH_REMATCH[2]}"
    [[ -e "$RUN_DIR/pids/$inst.pid" ]] || { echo "$inst is not running here (see \`make status\`)" >&2; exit 1; }
    stop_pid_file "$RUN_DIR/pids/$inst.pid" 12
    start_service "$name" "$slot"
    for _ in $(seq 1 400); do
        if ETCDCTL_API=3 etcdctl --endpoints "$(etcd_endpoints)" --command-timeout=2s \
            get /meshkit/services/ --prefix --keys-only 2>/dev/null | grep -q "/$inst\$"; then
            echo "$inst restarted (pid $(cat "$RUN_DIR/pids/$inst.pid"))"
            return 0
        fi
        pid_alive "$RUN_DIR/pids/$inst.pid" || break
        sleep 0.05
    done
    local pid; pid="$(cat "$RUN_DIR/pids/$inst.pid" 2>/dev/null || true)"
    echo "$inst did not register again within 20 s (pid $pid: $(ps -o stat=,etime=,wchan= -p "$pid" 2>/dev/null || echo gone)); its log:" >&2
    tail -20 "$RUN_DIR/logs/$inst.log" >&2 || true
    exit 1
}

cmd_down() {
    [[ -d "$RUN_DIR/pids" ]] || { echo "meshkit is not running"; return 0; }
    # Services first (they drain and revoke their leases), then the broker and etcd.
    local pids=()
    for f in "$RUN_DIR"/pids/*.pid; do
        case "$(basename "$f")" in etcd*.pid | kafka.pid | postgres.pid) continue ;; esac
        [[ -e "$f" ]] && { stop_pid_file "$f" 12 & pids+=($!); }
    done
    (( ${#pids[@]} )) && wait "${pids[@]}"
    # The JVM shuts down in a few seconds (a controlled shutdown flushes the logs).
    [[ -e "$RUN_DIR/pids/kafka.pid" ]] && stop_pid_file "$RUN_DIR/pids/kafka.pid" 30
    stop_postgres
    for f in "$RUN_DIR"/pids/etcd*.pid; do
        [[ -e "$f" ]] && stop_pid_file "$f" 10
    done
    rm -f "$RUN_DIR"/ports/*
    echo "meshkit stopped (data kept in $RUN_DIR; \`make clean-run\` removes it)"
}

# Docker: `make up` runs deploy/docker-compose.yml instead when an engine
# answers and MESHKIT_LOCAL is not 1.
COMPOSE_FILE="$ROOT/deploy/docker-compose.yml"
compose() {
    if docker compose version >/dev/null 2>&1; then docker compose -f "$COMPOSE_FILE" "$@"
    else docker-compose -f "$COMPOSE_FILE" "$@"; fi
}
docker_ok() {
    [[ "${MESHKIT_LOCAL:-0}" != 1 ]] && command -v docker >/dev/null && docker info >/dev/null 2>&1 \
        && { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; }
}

case "${1:-}" in
    docker-ok) docker_ok ;;
    compose-up)
        mkdir -p "$RUN_DIR" && touch "$RUN_DIR/compose"
        compose up -d --build
        compose ps
        echo "gateway: http://127.0.0.1:8080  (Jaeger http://127.0.0.1:16686, Prometheus http://127.0.0.1:9091, Grafana http://127.0.0.1:3000)"
        ;;
    up) cmd_up ;;
    down)
        if [[ -e "$RUN_DIR/compose" ]]; then compose down && rm -f "$RUN_DIR/compose"; else cmd_down; fi ;;
    status) [[ -d "$RUN_DIR/pids" ]] && cmd_status || echo "meshkit is not running" ;;
    restart) cmd_restart "${2:-}" ;;
    clean) # the run directory and PostgreSQL's data, wherever it is (after `down`)
        if [[ -d "$RUN_DIR" ]]; then rm -rf "$(pg_data_dir)" "$RUN_DIR"; fi ;;
    *) echo "usage: $0 up|down|status|restart INSTANCE|clean|compose-up|docker-ok" >&2; exit 2 ;;
esac
