#!/usr/bin/env bash
# Checks the deployment files without a cluster or a Docker engine: every
# Kubernetes manifest against the API schemas (kubernetes-validate --strict,
# unknown fields refused), the compose file with docker-compose's own parser,
# the Prometheus configuration with promtool, and the Grafana provisioning
# and dashboard as JSON/YAML. install-deps.sh installs the tools. (The
# dashboard's queries run against a real Prometheus in tests/prometheus.rs.)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
status=0
for f in "$here"/k8s/*.yaml; do
    if kubernetes-validate --strict --quiet "$f"; then echo "ok   $(basename "$f")"; else status=1; fi
done
if docker-compose -f "$here/docker-compose.yml" config -q; then
    echo "ok   docker-compose.yml"
else
    status=1
fi
if promtool check config "$here/prometheus/prometheus.yml" >/dev/null 2>&1; then
    echo "ok   prometheus/prometheus.yml"
else
    promtool check config "$here/prometheus/prometheus.yml" || true
    status=1
fi
for f in "$here"/grafana/*.json; do
    if python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["panels"] and d["uid"]' "$f"; then
        echo "ok   grafana/$(basename "$f")"
    else
        status=1
    fi
done
# One etcd version in three places: compose, Kubernetes, and the one the
# etcd-cluster tests build from the Go module proxy.
root_dir="$(cd "$here/.." && pwd)"
tested="$(sed -n 's/^require go.etcd.io\/etcd\/server\/v3 v\(.*\)$/\1/p' "$root_dir/services/integration-tests/tools/etcd/go.mod")"
for f in "$here/docker-compose.yml" "$here/k8s/etcd.yaml"; do
    shipped="$(sed -n 's/.*image: quay.io\/coreos\/etcd:v\(.*\)$/\1/p' "$f")"
    if [[ -n "$tested" && "$shipped" == "$tested" ]]; then
        echo "ok   $(basename "$f"): etcd $shipped, the version the tests run"
    else
        echo "FAIL $(basename "$f"): ships etcd '${shipped}', the tests build '${tested}' (services/integration-tests/tools/etcd/go.mod)"
        status=1
    fi
done
# The topics agree: what deploy/local/cluster.sh creates, compose and
# Kubernetes create with the same partitions and retention.
root="$(cd "$here/.." && pwd)"
while read -r name partitions retention; do
    for f in "$here/docker-compose.yml" "$here/k8s/kafka.yaml"; do
        if ! grep -Eq -- "--topic $name --partitions $partitions --replication-factor [0-9]+ --config retention.ms=$retention;?\$" "$f"; then
            echo "FAIL $(basename "$f"): topic $name is not created with $partitions partitions and retention.ms=$retention as in deploy/local/cluster.sh"
            status=1
        fi
    done
done < <(sed -n 's/^TOPICS=(\(.*\))$/\1/p' "$root/deploy/local/cluster.sh" | grep -o '"[^"]*"' | tr -d '"')
grep -q "^TOPICS=(" "$root/deploy/local/cluster.sh" || { echo "FAIL deploy/local/cluster.sh: no TOPICS"; status=1; }
kafka="$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$root/common/java/pom.xml")"
for f in "$here/docker-compose.yml" "$here/k8s/kafka.yaml"; do
    if grep -o 'apache/kafka:[0-9.]*' "$f" | grep -vqx "apache/kafka:$kafka"; then
        echo "FAIL $(basename "$f"): an apache/kafka image other than $kafka, the version make up runs"
        status=1
    fi
done
(( status )) || echo "ok   topics and the Kafka version agree across cluster.sh, compose and Kubernetes"
exit $status
