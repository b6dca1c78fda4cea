#!/usr/bin/env bash
# Runs every fuzz target of services/integration-tests/fuzz (cargo fuzz,
# libFuzzer, the nightly toolchain) for SECS seconds each, keeping each
# target's corpus between runs (fuzz/corpus, not committed). A crash stops
# the run with the input that caused it (fuzz/artifacts/TARGET/).
#
#   deploy/local/fuzz.sh [SECS]     make fuzz: 300 s each; make test: 15 s
set -euo pipefail
secs="${1:-300}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="$here/../../services/integration-tests/fuzz"
cd "$dir"
mkdir -p target
build_log="target/fuzz-build.log"
if ! cargo +nightly fuzz build -O >"$build_log" 2>&1; then
    # Say why: the compiler's errors, else the end of the log (a linker
    # killed, a full disk), and the space left where the build writes.
    grep -E '^error' -A8 "$build_log" | head -60 >&2 || true
    tail -25 "$build_log" >&2
    echo "fuzz: the targets do not build ($(df -h --output=avail . | tail -1 | tr -d ' ') free on this disk)" >&2
    exit 1
fi
grep -E '^warning: unused' -A5 "$build_log" || true
status=0
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    log="target/fuzz-$target.log"
    if cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
        runs="$(grep -oE '^Done [0-9]+ runs' "$log" | awk '{print $2}')"
        cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')"
        echo "ok   fuzz $target: ${runs:-?} inputs in ${secs} s, coverage ${cov:-?} edges, corpus $(find "corpus/$target" -type f | wc -l) inputs"
    else
        status=1
        echo "FAIL fuzz $target: $(grep -E 'ERROR|panicked' "$log" | head -3)"
        grep -E 'Test unit written to|artifact_prefix' "$log" | head -2
    fi
done
exit "$status"
