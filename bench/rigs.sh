#!/usr/bin/env bash
# Gateway memory and CPU with many rigs connected: a release gateway, `node-runner swarm` with
# RIGS simulated rigs in a second process (enrolled, tunnels open, heartbeats every 5 s), then
# idle and under load. Usage: bench/rigs.sh [RIGS...]   (default: 200 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("${@:-200}")
[[ $# -eq 0 ]] && counts=(200 1000)

# The gateway embeds its default plugins, built for wasm32-wasip2.
if command -v rustup >/dev/null 2>&1; then
    rustup target add wasm32-wasip2 >/dev/null 2>&1 || echo "warning: could not add the wasm32-wasip2 target" >&2
fi
cargo build --release -q -p garage-gateway-bin -p garage-node-runner
command -v wrk >/dev/null || { apt-get update -q && apt-get install -y -q wrk; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
wait_for() { # wait_for SECONDS COMMAND...
    local until=$((SECONDS + $1)); shift
    until "$@"; do (( SECONDS < until )) || return 1; sleep 0.2; done
}

echo "| rigs | join time s | gateway RSS MiB idle | gateway CPU % idle (heartbeats) | RSS MiB under load | req/s under load (c=16, plain) | gateway CPU µs/req |"
echo "|--:|--:|--:|--:|--:|--:|--:|"
for rigs in "${counts[@]}"; do
    port=$(free_port)
    cat >"$work/gw.toml" <<TOML
listen = "127.0.0.1:$port"
[auth]
admin_token = "bench-admin"
TOML
    RUST_LOG=warn target/release/gateway serve --config "$work/gw.toml" >"$work/gw.log" 2>&1 &
    gw=$!; pids+=("$gw")
    base="http://127.0.0.1:$port"
    wait_for 30 curl -sf "$base/health" -o /dev/null
    key=$(curl -sf -H 'Authorization: Bearer bench-admin' -H 'Content-Type: application/json' \
        -d '{"name":"bench"}' "$base/admin/keys" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
    token=$(curl -sf -H 'Authorization: Bearer bench-admin' -H 'Content-Type: application/json' \
        -d "{\"operator\":\"bench\",\"max_uses\":$rigs}" "$base/admin/enrollment-tokens" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    start=$SECONDS
    RUST_LOG=warn target/release/node-runner swarm --gateway "$base" --token "$token" --count "$rigs" \
        --model sim-model >"$work/swarm.log" 2>&1 &
    swarm=$!; pids+=("$swarm")
    routable() {
        local n
        n=$(curl -sf -H 'Authorization: Bearer bench-admin' "$base/admin/nodes" \
            | python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin)["data"] if n["routable"]))')
        [[ "${n:-0}" -ge "$rigs" ]]
    }
    wait_for 180 routable || { echo "rigs did not all join"; tail "$work/swarm.log"; exit 1; }
    joined=$((SECONDS - start))
    # Idle: only heartbeats (every 5 s per rig) and tunnel pings.
    t0=$(cpu_ticks "$gw"); sleep 20; t1=$(cpu_ticks "$gw")
    idle_cpu=$(python3 -c "print(round(($t1-$t0)/$clk/20*100, 2))")
    idle_rss=$(python3 -c "print(round($(rss_kib "$gw")/1024, 1))")
    cat >"$work/chat.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
wrk.body = '{"model":"sim-model","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}'
LUA
    t0=$(cpu_ticks "$gw")
    out=$(wrk -t1 -c16 -d10s -s "$work/chat.lua" "$base/v1/chat/completions")
    t1=$(cpu_ticks "$gw")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    load_rss=$(python3 -c "print(round($(rss_kib "$gw")/1024, 1))")
    us_per_req=$(python3 -c "print(round(($t1-$t0)/$clk*1e6/max($reqs,1), 1))")
    echo "| $rigs | $joined | $idle_rss | $idle_cpu | $load_rss | $rps | $us_per_req |"
    kill "$swarm" "$gw"; wait "$swarm" "$gw" 2>/dev/null || true
    pids=()
done
