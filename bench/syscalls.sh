#!/usr/bin/env bash
# Where a proxy's CPU goes per request, from the kernel's side: the system calls it makes and
# the context switches it takes per request (perf's tracepoints: exact counts), and how its
# CPU time splits between the kernel and its own code (perf's cpu-clock sampling). Run against
# the gateway and against hyper-floor, it says whether the gateway's extra cost is more work in
# the kernel (more syscalls, more wake-ups) or more work of its own.
#
# Usage: bench/syscalls.sh                        gateway, plain chat
#        BENCH_TARGET=hyper-floor bench/syscalls.sh
#        BENCH_STREAM=1 bench/syscalls.sh          streamed chat
#
# Environment:
#   BENCH_TARGET       gateway (default) or hyper-floor
#   BENCH_STREAM       1: streamed chat (default 0)
#   BENCH_CONCURRENCY  wrk connections (default 16)
#   BENCH_DURATION     seconds counted (default 4)
#   BENCH_WARMUP       seconds of load before each count (default 1); the gateway's embedded
#                      ledger keeps 100,000 requests, so a warm-up of ~10 s measures it full,
#                      dropping its oldest entry at each insert, as a long-running gateway runs
#   BENCH_PROFILE      the cargo profile measured (default dist, as bench/run.sh)
#   BENCH_SKIP_BUILD   1: use the binaries of that profile already in the target directory
#   BENCH_GATEWAY_LOG  the gateway's RUST_LOG (default warn)
#   BENCH_UPSTREAM     tcp (default) or unix: the engine on a Unix domain socket, reached through
#                      the gateway upstream's unix_socket (the gateway only)
#
# GARAGE_* variables in the environment reach the gateway (unlike in bench/run.sh): set one to
# measure a setting, such as GARAGE_USAGE_LEDGER_MAX_ENTRIES=1000 against the default.
#
# Needs perf (apt-get install linux-perf) with tracepoints readable (perf_event_paranoid <= 2
# as root), wrk and curl. The counts hardly depend on how busy the machine is; the µs do, so
# compare the two targets in one quiet spell.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TARGET=${BENCH_TARGET:-gateway}
STREAM=${BENCH_STREAM:-0}
CONCURRENCY=${BENCH_CONCURRENCY:-16}
DURATION=${BENCH_DURATION:-4}
WARMUP=${BENCH_WARMUP:-1}
PROFILE=${BENCH_PROFILE:-dist}
NAME=syscalls.sh
# shellcheck source=bench/lib.sh
source bench/lib.sh

for tool in perf wrk curl; do command -v $tool >/dev/null || die "$tool is not installed"; done
perf list 2>/dev/null | grep -c 'raw_syscalls:sys_enter' >/dev/null ||
    die "perf cannot see the syscall tracepoints here (perf_event_paranoid, or no tracefs)"

build_unless_skipped
start_engine
# A free port picked here: the gateway at RUST_LOG=warn does not print its address.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
    echo $((20000 + RANDOM % 10000)))
start_target "$PORT" ""

SCRIPT=bench/chat.lua
[[ $STREAM == 1 ]] && SCRIPT=bench/chat_stream.lua

# One load run per measurement: counting and sampling at once would bias both.
measure() { # output-file perf-args...
    local out=$1
    shift
    wrk -t1 -c"$CONCURRENCY" -d"${WARMUP}s" -s "$SCRIPT" "$URL" >/dev/null
    # perf attaches for exactly the counted seconds, well inside the run.
    wrk -t1 -c"$CONCURRENCY" -d"$((DURATION + 3))s" -s "$SCRIPT" "$URL" >"$WORK/wrk.out" &
    local wrk_pid=$!
    sleep 0.5
    perf "$@" -p "$TARGET_PID" -- sleep "$DURATION" 2>"$out" >/dev/null
    wait "$wrk_pid"
    grep -q 'Non-2xx\|Socket errors' "$WORK/wrk.out" && die "wrk saw errors: $(cat "$WORK/wrk.out")"
    awk '/Requests\/sec/{print $2}' "$WORK/wrk.out"
}

log "$TARGET, stream=$STREAM, concurrency $CONCURRENCY: counting syscalls for ${DURATION} s"
# A few named tracepoints (all 361 syscalls' take perf seconds to attach), and the total.
EVENTS=raw_syscalls:sys_enter,sched:sched_switch,page-faults
for call in recvfrom read readv recvmsg writev write sendto sendmsg epoll_wait futex sched_yield madvise mmap munmap; do
    EVENTS+=,syscalls:sys_enter_$call
done
RPS_COUNT=$(measure "$WORK/stat.out" stat -x, -e "$EVENTS")
log "sampling CPU for ${DURATION} s"
RPS_SAMPLE=$(measure "$WORK/record.err" record -q -F 999 -o "$WORK/perf.data")

echo "$TARGET stream=$STREAM c=$CONCURRENCY"
echo "per request ($RPS_COUNT req/s while counting):"
awk -F, -v n="$(awk -v r="$RPS_COUNT" -v d="$DURATION" 'BEGIN{print r*d}')" \
    '$1+0 > 0 { name = $3; sub(/^syscalls:sys_enter_/, "", name); sub(/^raw_syscalls:sys_enter$/, "all syscalls", name); printf "  %-20s %6.2f\n", name, $1 / n }' \
    "$WORK/stat.out" | sort -k2 -nr
perf report -i "$WORK/perf.data" --no-children --sort dso -F period,dso --stdio 2>/dev/null |
    awk -v n="$(awk -v r="$RPS_SAMPLE" -v d="$DURATION" 'BEGIN{print r*d}')" -v rps="$RPS_SAMPLE" '
        /^#/ || NF < 2 { next }
        { ns = $1; if ($2 == "[kernel.kallsyms]") k += ns; else u += ns }
        END {
            printf "CPU per request (%s req/s while sampling): %.1f us, kernel %.1f us, user %.1f us\n",
                rps, (k + u) / n / 1000, k / n / 1000, u / n / 1000
        }'
