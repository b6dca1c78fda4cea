#!/usr/bin/env bash
# phase.sh NAME CMD...: runs CMD, then says how many minutes phase NAME took
# and whether it failed; exits with CMD's status.
name="$1"; shift
t0=$(date +%s)
"$@"
rc=$?
# A failed phase also says the disk space left: a build that fills the disk
# fails in ways that do not always say so.
free=""
(( rc )) && free="; $(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' ') free on this disk"
awk -v n="$name" -v s="$t0" -v e="$(date +%s)" -v r="$rc" -v f="$free" \
    'BEGIN {printf "phase %-10s %5.1f min%s\n", n ":", (e - s) / 60, (r ? "  FAILED (exit " r f ")" : "")}'
exit "$rc"
