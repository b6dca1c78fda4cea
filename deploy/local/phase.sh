#!/usr/bin/env bash
# phase.sh NAME CMD...: runs CMD, then says how many minutes phase NAME took
# and whether it failed; exits with CMD's status.
name="$1"; shift
t0=$(date +%s)
"$@"
rc=$?
awk -v n="$name" -v s="$t0" -v e="$(date +%s)" -v r="$rc" \
    'BEGIN {printf "phase %-10s %5.1f min%s\n", n ":", (e - s) / 60, (r ? "  FAILED (exit " r ")" : "")}'
exit "$rc"
