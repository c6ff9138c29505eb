#!/usr/bin/env bash
# Instructions per request: the gateway (or hyper-floor) under valgrind's callgrind, counting
# the user-space instructions it executes while wrk sends it chat completions. Unlike the
# timings of bench/run.sh, the count hardly depends on how busy or fast the machine is, so a
# change of a few percent shows (two runs of one binary agree within about 1 %). It counts no
# kernel time and no waiting, and valgrind's virtual CPU lacks some extensions (SHA: the HMAC
# of the API key costs ~7k instructions there, almost nothing on the real CPU).
#
# Usage: bench/instructions.sh                 gateway, plain chat
#        BENCH_STREAM=1 bench/instructions.sh  gateway, streamed chat
#        BENCH_TARGET=hyper-floor bench/instructions.sh
#
# Environment:
#   BENCH_TARGET       gateway (default) or hyper-floor
#   BENCH_STREAM       1: streamed chat (default 0)
#   BENCH_UPSTREAM     tcp (default) or unix: the engine on a Unix domain socket, reached through
#                      the gateway upstream's unix_socket (the gateway only)
#   BENCH_DURATION     seconds of counted load (default 10)
#   BENCH_CONCURRENCY  wrk connections (default 4: valgrind runs the program about 50x slower)
#   BENCH_PROFILE      the cargo profile built and measured (default dist: release with fat
#                      LTO, what to deploy; release is the demo's, ~7 % more instructions)
#   BENCH_SKIP_BUILD   1: use the binaries of that profile already in the target directory
#   BENCH_KEEP         1: keep the callgrind output (for callgrind_annotate) and print its path
#   BENCH_PLUGINS      1: the gateway with its four default policy plugins (default 0: none)
#   BENCH_UPSTREAMS    upstream entries for the one engine, for a router to choose among
#                      (default 1)
#   BENCH_MAX_INSTANCES  the gateway's plugins.max_instances (default 4; valgrind cannot
#                      reserve the address space of the default pool of 1000, nor of 16)
#   BENCH_COMPONENTS   components to upload before counting, as `slot=path` words (e.g.
#                      "router=r.wasm meter=m.wasm"): what a plugin of your own costs per
#                      request; `slot=none` empties the slot (what one default policy costs)
#   BENCH_GATEWAY_LOG  the gateway's RUST_LOG (default warn; the gateway's own default is info,
#                      where the span each request runs in costs ~6k instructions more)
#
# Needs valgrind (apt-get install valgrind) and wrk. Prints one line:
#   <target> stream=<0|1>: <requests> requests, <instructions> instructions per request

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TARGET=${BENCH_TARGET:-gateway}
STREAM=${BENCH_STREAM:-0}
DURATION=${BENCH_DURATION:-10}
CONCURRENCY=${BENCH_CONCURRENCY:-4}
# The cargo profile measured: dist (what to deploy; see Cargo.toml) unless told otherwise.
PROFILE=${BENCH_PROFILE:-dist}
NAME=instructions.sh
# shellcheck source=bench/lib.sh
source bench/lib.sh

command -v valgrind >/dev/null || die "valgrind is not installed (apt-get install valgrind)"
command -v callgrind_control >/dev/null || die "callgrind_control is missing (part of valgrind)"
command -v wrk >/dev/null || die "wrk is not installed (apt-get install wrk)"

build_unless_skipped
start_engine
# A fixed free port for the program under valgrind (its startup is slow to parse for);
# valgrind cannot reserve the address space of the gateway's default instance pool.
start_target $((20000 + RANDOM % 10000)) "[plugins]"$'\n'"max_instances = ${BENCH_MAX_INSTANCES:-4}" \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out"

for component in ${BENCH_COMPONENTS:-}; do
    slot=${component%%=*} file=${component#*=}
    if [[ $file == none ]]; then
        curl -fsS -o /dev/null -X DELETE "$URL/admin/plugins/$slot" \
            -H "Authorization: Bearer $ADMIN" || die "could not empty $slot"
    else
        curl -fsS -o /dev/null -X PUT "$URL/admin/plugins/$slot" -H "Authorization: Bearer $ADMIN" \
            -H 'Content-Type: application/wasm' --data-binary "@$file" || die "could not upload $component"
    fi
done

SCRIPT=bench/chat.lua
[[ $STREAM == 1 ]] && SCRIPT=bench/chat_stream.lua
log "$TARGET under callgrind: 3 s warm-up, then ${DURATION} s counted at concurrency $CONCURRENCY"
wrk -t1 -c"$CONCURRENCY" -d3s -s "$SCRIPT" "$URL" >/dev/null
callgrind_control -i on "$TARGET_PID" >/dev/null 2>&1
wrk -t1 -c"$CONCURRENCY" -d"${DURATION}s" -s "$SCRIPT" "$URL" >"$WORK/wrk.out"
callgrind_control -i off "$TARGET_PID" >/dev/null 2>&1
callgrind_control -d "$TARGET_PID" >/dev/null 2>&1
REQUESTS=$(awk '/requests in/{print $1}' "$WORK/wrk.out")
ERRORS=$(grep -c 'Non-2xx\|Socket errors' "$WORK/wrk.out" || true)
[[ $ERRORS == 0 ]] || die "wrk saw errors: $(cat "$WORK/wrk.out")"
for ((i = 0; i < 50; i++)); do
    ls "$WORK"/callgrind.out* >/dev/null 2>&1 && grep -qh '^totals:' "$WORK"/callgrind.out* && break
    sleep 0.2
done
TOTAL=$(grep -h '^totals:' "$WORK"/callgrind.out* | awk '{s += $2} END {print s}')
[[ -n $REQUESTS && $REQUESTS -gt 0 && -n $TOTAL ]] || die "no count (see $WORK)"
echo "$TARGET stream=$STREAM: $REQUESTS requests, $((TOTAL / REQUESTS)) instructions per request"
[[ ${BENCH_KEEP:-0} == 1 ]] && echo "callgrind output: $(ls "$WORK"/callgrind.out*)" >&2
exit 0
