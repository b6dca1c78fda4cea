#!/usr/bin/env bash
# Checks the deployment files without a cluster or a Docker engine: every
# Kubernetes manifest against the API schemas (kubernetes-validate --strict,
# unknown fields refused), and the compose file with docker-compose's own
# parser. install-deps.sh --test installs both.
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
exit $status
