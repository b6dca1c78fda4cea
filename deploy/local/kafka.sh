#!/usr/bin/env bash
# Apache Kafka (KRaft) for `make up` and the tests, from the jars Maven resolves
# (deploy/kafka/pom.xml; the version is pinned in common/java/pom.xml).
#
#   kafka.sh install                  resolve the broker's classpath into the cache (once)
#   kafka.sh libs                     print the classpath folder
#   kafka.sh version                  print the pinned Kafka version
#   kafka.sh java                     print the Java (17 or newer) it runs, or fail
#   kafka.sh run DIR PORT CTRL_PORT   format DIR (first time) and run one node, broker and
#                                     controller, in the foreground: 127.0.0.1:PORT for
#                                     clients, 127.0.0.1:CTRL_PORT for the controller quorum;
#                                     data and logs under DIR, and DIR/admin.properties, the
#                                     client settings for Kafka's tools (--command-config)
#   kafka.sh topics ARGS...           Kafka's TopicCommand (kafka-topics.sh), e.g.
#                                     kafka.sh topics --bootstrap-server 127.0.0.1:9092 --list
#
# Settings from the environment: MESHKIT_KAFKA_HEAP (default 512m, the heap's
# ceiling), MESHKIT_CACHE (default ~/.cache/meshkit), and for `run`:
#   MESHKIT_KAFKA_NODE_ID       this node's id (1)
#   MESHKIT_KAFKA_VOTERS        the controller quorum, ID@HOST:PORT,... (this node alone)
#   MESHKIT_KAFKA_CLUSTER_ID    the id DIR is formatted with; every member of a cluster
#                               needs the same (random)
#   MESHKIT_KAFKA_TLS_CA        with _CERT and _KEY (PEM files, PKCS#8 key): TLS on the
#   MESHKIT_KAFKA_TLS_CERT      client listener, which the brokers also use among
#   MESHKIT_KAFKA_TLS_KEY       themselves
#   MESHKIT_KAFKA_CLIENT_AUTH   `required`: clients must show a certificate of that CA (none)
#   MESHKIT_KAFKA_SCRAM_USERS   USER:PASSWORD,...: SASL SCRAM-SHA-512 on the client
#                               listener, the users created when DIR is formatted; the
#                               brokers authenticate to each other as the first
#   MESHKIT_KAFKA_PROPERTIES    more server.properties lines; a key given again wins
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$root/common/java/pom.xml")"
cache="${MESHKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshkit}/kafka-$version"
libs="$cache/libs"

installed() { [[ -f "$cache/complete" ]]; }

# The broker needs Java 17 or newer: `java` on PATH when it is, else a JDK or
# JRE 17+ under /usr/lib/jvm (Ubuntu 22.04's default is 11).
java_major() { "$1" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
find_java() {
    local j
    for j in "${MESHKIT_JAVA:-}" "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
        [[ -n "$j" && -x "$j" ]] || continue
        (( $(java_major "$j" || echo 0) >= 17 )) && { echo "$j"; return 0; }
    done
    return 1
}

install() {
    installed && return 0
    command -v mvn >/dev/null || { echo "kafka.sh: mvn is missing (deploy/local/install-deps.sh installs it)" >&2; exit 1; }
    echo "kafka.sh: resolving Apache Kafka $version from Maven Central into $cache"
    rm -rf "$cache"
    mkdir -p "$cache"
    local t0=$SECONDS
    # Maven's output goes to a log, shown only when it fails.
    if ! mvn -q -B -f "$root/common/java/pom.xml" -pl ../../deploy/kafka \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs" >"$cache.log" 2>&1; then
        echo "kafka.sh: Maven could not resolve the broker's jars:" >&2
        tail -20 "$cache.log" >&2
        rm -rf "$cache"
        exit 1
    fi
    rm -f "$cache.log"
    echo "$version" >"$cache/complete"
    echo "kafka.sh: Apache Kafka $version ready ($(ls "$libs" | wc -l) jars, $((SECONDS - t0)) s)"
}

need_libs() {
    installed || { echo "kafka.sh: Apache Kafka $version is not installed: run deploy/local/install-deps.sh" >&2; exit 1; }
    JAVA="$(find_java)" || { echo "kafka.sh: Kafka needs Java 17 or newer (deploy/local/install-deps.sh installs it)" >&2; exit 1; }
}

java_opts=(
    -Xms64m "-Xmx${MESHKIT_KAFKA_HEAP:-512m}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$root/deploy/kafka/log4j2.xml"
)

# A PEM file as one properties value: its lines joined by \n escapes.
pem_value() { awk 'NF { printf "%s\\n", $0 }' "$1"; }

run() {
    local dir="$1" port="$2" ctrl="$3"
    need_libs
    mkdir -p "$dir/data" "$dir/logs"
    dir="$(cd "$dir" && pwd)"
    local node="${MESHKIT_KAFKA_NODE_ID:-1}"
    local voters="${MESHKIT_KAFKA_VOTERS:-$node@127.0.0.1:$ctrl}"
    local protocol=PLAINTEXT tls=() sasl=() admin=() scram=() users=() user pass
    if [[ -n "${MESHKIT_KAFKA_TLS_CERT:-}" ]]; then
        local f
        for f in "${MESHKIT_KAFKA_TLS_CA:-}" "$MESHKIT_KAFKA_TLS_CERT" "${MESHKIT_KAFKA_TLS_KEY:-}"; do
            [[ -r "$f" ]] || { echo "kafka.sh: MESHKIT_KAFKA_TLS_CA, _CERT and _KEY must name readable PEM files (got \"$f\")" >&2; exit 2; }
        done
        grep -q 'BEGIN PRIVATE KEY' "$MESHKIT_KAFKA_TLS_KEY" \
            || { echo "kafka.sh: $MESHKIT_KAFKA_TLS_KEY is not an unencrypted PKCS#8 key (BEGIN PRIVATE KEY)" >&2; exit 2; }
        protocol=SSL
        tls=(
            "ssl.keystore.type=PEM"
            "ssl.keystore.certificate.chain=$(pem_value "$MESHKIT_KAFKA_TLS_CERT")"
            "ssl.keystore.key=$(pem_value "$MESHKIT_KAFKA_TLS_KEY")"
            "ssl.truststore.type=PEM"
            "ssl.truststore.certificates=$(pem_value "$MESHKIT_KAFKA_TLS_CA")"
            "ssl.client.auth=${MESHKIT_KAFKA_CLIENT_AUTH:-none}"
        )
        admin+=("${tls[@]:0:5}")
    fi
    if [[ -n "${MESHKIT_KAFKA_SCRAM_USERS:-}" ]]; then
        IFS=, read -r -a users <<<"$MESHKIT_KAFKA_SCRAM_USERS"
        for user in "${users[@]}"; do
            [[ "$user" =~ ^[A-Za-z0-9._-]+:[A-Za-z0-9._-]+$ ]] \
                || { echo "kafka.sh: MESHKIT_KAFKA_SCRAM_USERS takes USER:PASSWORD,... of letters, digits, . _ - (got \"${user%%:*}:…\")" >&2; exit 2; }
            scram+=(--add-scram "SCRAM-SHA-512=[name=${user%%:*},password=${user#*:}]")
        done
        user="${users[0]%%:*}" pass="${users[0]#*:}"
        protocol="SASL_$protocol"
        local jaas="org.apache.kafka.common.security.scram.ScramLoginModule required username=\"$user\" password=\"$pass\";"
        sasl=(
            "sasl.enabled.mechanisms=SCRAM-SHA-512"
            "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512"
            "listener.name.client.scram-sha-512.sasl.jaas.config=$jaas"
        )
        admin+=("sasl.mechanism=SCRAM-SHA-512" "sasl.jaas.config=$jaas")
    fi
    # Keys, certificates and passwords go in these files: only this user reads them.
    umask 077
    {
        cat <<PROPS
# Written by deploy/local/kafka.sh: a KRaft node, broker and controller.
process.roles=broker,controller
node.id=$node
controller.quorum.voters=$voters
listeners=CLIENT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctrl
advertised.listeners=CLIENT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=CLIENT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,CLIENT:$protocol
log.dirs=$dir/data
# Topics are created on purpose (cluster.sh, or meshkit at start), never by a typo.
auto.create.topics.enable=false
num.partitions=6
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
log.segment.bytes=67108864
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
PROPS
        printf '%s\n' "${tls[@]}" "${sasl[@]}"
        [[ -n "${MESHKIT_KAFKA_PROPERTIES:-}" ]] && printf '%s\n' "$MESHKIT_KAFKA_PROPERTIES"
    } >"$dir/server.properties"
    printf '%s\n' "security.protocol=$protocol" "${admin[@]}" >"$dir/admin.properties"
    umask 022
    if [[ ! -f "$dir/data/meta.properties" ]]; then
        local id="${MESHKIT_KAFKA_CLUSTER_ID:-}"
        [[ -n "$id" ]] || id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
        # --cluster-id=ID: an id may start with "-", which a separate argument would not survive.
        "$JAVA" -cp "$libs/*" "${java_opts[@]}" -Xmx256m kafka.tools.StorageTool format \
            --cluster-id="$id" -c "$dir/server.properties" "${scram[@]}" >"$dir/logs/format.log" 2>&1 \
            || { echo "kafka.sh: formatting $dir failed:" >&2; tail -5 "$dir/logs/format.log" >&2; exit 1; }
    fi
    exec "$JAVA" -cp "$libs/*" "${java_opts[@]}" "-Dkafka.logs.dir=$dir/logs" kafka.Kafka "$dir/server.properties"
}

case "${1:-}" in
    install) install ;;
    libs) need_libs; echo "$libs" ;;
    version) echo "$version" ;;
    java) find_java ;;
    run) [[ $# == 4 ]] || { echo "usage: kafka.sh run DIR PORT CTRL_PORT" >&2; exit 2; }; run "$2" "$3" "$4" ;;
    topics) shift; need_libs; exec "$JAVA" -cp "$libs/*" "${java_opts[@]}" -Xmx256m org.apache.kafka.tools.TopicCommand "$@" ;;
    *) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
