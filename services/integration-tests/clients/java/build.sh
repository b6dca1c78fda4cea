#!/usr/bin/env bash
# Builds the Java client from proto/ with plain javac against Debian's jars
# (libgrpc-java, protobuf-compiler-grpc-java-plugin, libprotobuf-java and the
# single netty jars; Debian's netty-all.jar is empty). No Maven registry is
# needed; pom.xml beside this script is the same build for Maven users.
#   build.sh OUT_DIR      generates, compiles, and writes OUT_DIR/classpath
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../../.." && pwd)"
out="${1:-$root/target/java-client}"
J=/usr/share/java
jars=(
    grpc-api grpc-core grpc-context grpc-stub grpc-protobuf grpc-protobuf-lite grpc-netty
    protobuf guava failureaccess perfmark-api perfmark-impl perfmark-java7 perfmark-java9 error_prone_annotations jsr305 geronimo-annotation-1.3-spec
    netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-codec-socks netty-common
    netty-handler netty-handler-proxy netty-resolver netty-transport
)
cp=""
for jar in "${jars[@]}"; do
    if [[ -f "$J/$jar.jar" ]]; then cp="$cp:$J/$jar.jar"; fi
done
cp="${cp#:}"
rm -rf "$out/gen" "$out/classes"
mkdir -p "$out/gen" "$out/classes"
# buf/validate/validate.proto (protovalidate's, which meshkit's files import for
# their request rules) is generated here too: protovalidate-java's jar, which the
# Maven build uses instead, needs a newer protobuf-java than Debian's.
protoc --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
    --java_out="$out/gen" --grpc-java_out="$out/gen" -I "$root/proto" \
    "$root/proto/google/api/http.proto" "$root/proto/google/api/annotations.proto" \
    "$root/proto/buf/validate/validate.proto" \
    "$root/proto/meshkit/user/v1/user.proto" "$root/proto/meshkit/order/v1/order.proto"
find "$out/gen" "$here/src/io/meshkit/interop" -name '*.java' >"$out/sources.txt"
javac -nowarn -encoding UTF-8 -d "$out/classes" -cp "$cp" @"$out/sources.txt"
echo "$out/classes:$cp" >"$out/classpath"
echo "java client built: java -cp \"\$(cat $out/classpath)\" io.meshkit.interop.Client 127.0.0.1:8080"
