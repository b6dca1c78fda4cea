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
exit $status
