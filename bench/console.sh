#!/usr/bin/env bash
# Console page loads in headless chromium against `gateway demo` (release build): the median and
# worst load time of each operator page. Needs chromium, chromedriver and the test virtualenv
# (scripts/test.sh makes .venv and installs them). See docs/performance.md ("The console").
#
# Usage: bench/console.sh
#   BENCH_SKIP_BUILD=1       use the binary already built
#   BENCH_GATEWAY=path       the gateway binary (default target/release/gateway)
#   BENCH_PYTHON=path        a python with selenium (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
GATEWAY=${BENCH_GATEWAY:-target/release/gateway}
PYTHON=${BENCH_PYTHON:-.venv/bin/python}
[[ "${BENCH_SKIP_BUILD:-}" == 1 ]] || cargo build --release -p garage-gateway-bin >&2
work="$(mktemp -d)"
trap 'kill "$demo" 2>/dev/null || true; rm -rf "$work"' EXIT
printf 'bench-admin-token\n' >"$work/admin-token"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$GATEWAY" demo --listen "127.0.0.1:$port" --admin-token-file "$work/admin-token" \
    >"$work/demo.log" 2>&1 &
demo=$!
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.1
done
"$PYTHON" bench/console_load.py --base "http://127.0.0.1:$port" --token bench-admin-token
