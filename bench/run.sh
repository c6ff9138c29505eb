#!/usr/bin/env bash
# Gateway overhead benchmark: the same chat-completion load sent straight to a zero-latency
# simulated engine and through the gateway in front of it, so the difference is what the gateway
# adds. See bench/README.md.
#
# Usage: bench/run.sh            (full run, about 2 minutes of load)
#        BENCH_DURATION=2 BENCH_CONCURRENCY="1 16" bench/run.sh   (quick run)
#
# Environment:
#   BENCH_DURATION     seconds of measured load per case (default 8)
#   BENCH_WARMUP       seconds of unmeasured load before each case (default 2; 0 disables)
#   BENCH_CONCURRENCY  connections per case, space- or comma-separated (default "1 16 64")
#   BENCH_ROUNDS       times each group of rows (one stream mode and concurrency, every mode)
#                      is measured, the modes alternating; each row reported is the mode's
#                      median round by req/s, and every round is listed under the table
#                      (default 1). On a machine whose speed drifts, 3 or 5.
#   BENCH_THREADS      wrk threads, capped at the connection count (default 1: leave the cores
#                      to the servers; wrk's one epoll thread is far from saturated here)
#   BENCH_MAX_TOKENS   tokens the engine generates per request (default 16)
#   BENCH_PROFILE      the cargo profile built and measured (default dist: release with fat
#                      LTO, what to deploy; release is the demo's, ~7 % more instructions)
#   BENCH_SKIP_BUILD   1: use the binaries of that profile already in the target directory
#   BENCH_GATEWAY_LOG  the gateway's RUST_LOG (default warn; the gateway's own default is info,
#                      where the span each request runs in costs ~6k instructions more)
#   BENCH_WAIT_IDLE    seconds to wait, before measuring, for compilers (cargo, rustc...) on the
#                      machine to finish (default 0: do not wait); the run goes on after that
#   BENCH_NOISY_RETRIES  times a group of rows (one stream mode and concurrency) is measured
#                      again when something else used over 10 % of the machine during it
#                      (default 2); each retry first waits, up to 60 s, for compilers to finish
#   BENCH_REFERENCE_HYPER  1: also measure hyper-floor (bench/hyper-floor, built here): a bare
#                      hyper reverse proxy on the gateway's own libraries, doing nothing else
#   BENCH_REFERENCE_NGINX  1: also measure nginx (must be installed) as a reverse proxy in front
#                      of the same engine: a yardstick for what any HTTP proxy costs on this box
#   BENCH_GATEWAY_WORKERS  the gateway's worker_threads (--worker-threads; default: unset, one
#                      per CPU); 1 runs it on tokio's single-threaded scheduler
#   BENCH_STORE        memory (default: the embedded store) or redis: a redis-server started
#                      for the run, each gateway on a database of its own
#   BENCH_UPSTREAM     tcp (default) or unix: how the gateway (and nginx) reach the engine. unix
#                      starts a second, identical engine on a Unix domain socket (vLLM's --uds)
#                      for them, and the gateway reaches it through its upstream's unix_socket;
#                      the direct rows and hyper-floor stay on TCP
#   BENCH_KEY_LIMITS   1: the API keys carry rate limits that are never reached (rpm 100000000,
#                      tpm 1000000000 in their metadata), so the default rate limiter reserves
#                      from its counters on every request, as it does for a realistic key
#                      (default 0: a key with no limits, for which the limiter reserves nothing)
#   BENCH_POLICIES_TOML  extra TOML for the gateway with policies (BENCH_PLUGINS=both), e.g.
#                      $'[plugins.rate-limiter]\nwarm_instances = 32' (default: none)
#
# With BENCH_STORE=redis the report also counts the Redis commands each gateway sent per
# request (INFO commandstats of the gateway's own database's server, before and after a row).
#
# Progress goes to stderr; the markdown report goes to stdout and bench/results/latest.md.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DURATION=${BENCH_DURATION:-8}
WARMUP=${BENCH_WARMUP:-2}
CONCURRENCY=${BENCH_CONCURRENCY:-"1 16 64"}
CONCURRENCY=${CONCURRENCY//,/ }
THREADS=${BENCH_THREADS:-1}
ROUNDS=${BENCH_ROUNDS:-1}
MAX_TOKENS=${BENCH_MAX_TOKENS:-16}
SKIP_BUILD=${BENCH_SKIP_BUILD:-0}
REFERENCE_NGINX=${BENCH_REFERENCE_NGINX:-0}
REFERENCE_HYPER=${BENCH_REFERENCE_HYPER:-0}
WAIT_IDLE=${BENCH_WAIT_IDLE:-0}
NOISY_RETRIES=${BENCH_NOISY_RETRIES:-2}
# Policy plugins: 0 = the gateway's built-in fallbacks only, 1 = the default plugins
# (least-loaded router, rate limiter, meter, reward), hot = the default router and rate limiter
# only (the hot path), from the files the build made; both = two gateways side by side in one
# run, bare (`gateway` rows) and with the four default plugins (`policies` rows), compared.
PLUGINS=${BENCH_PLUGINS:-0}
# Upstream entries, all pointing at the one engine: the router plugin chooses among this many
# candidates (it is not called for one).
UPSTREAMS=${BENCH_UPSTREAMS:-1}
UPSTREAM=${BENCH_UPSTREAM:-tcp}
# memory (the embedded store) or redis (a redis-server of the benchmark's own).
STORE=${BENCH_STORE:-memory}
KEY_LIMITS=${BENCH_KEY_LIMITS:-0}
GATEWAY_WORKERS=${BENCH_GATEWAY_WORKERS:-}
NOISY_PERCENT=10
MODEL=sim-llama-3-8b
RESULTS_DIR=$ROOT/bench/results
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# The cargo profile measured: dist (what to deploy; see Cargo.toml) unless told otherwise.
PROFILE=${BENCH_PROFILE:-dist}
BIN=$TARGET_DIR/$PROFILE

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_uint "$DURATION" && ((DURATION > 0)) || die "BENCH_DURATION must be a positive integer (seconds)"
is_uint "$WARMUP" || die "BENCH_WARMUP must be a non-negative integer (seconds)"
is_uint "$THREADS" && ((THREADS > 0)) || die "BENCH_THREADS must be a positive integer"
is_uint "$ROUNDS" && ((ROUNDS > 0)) || die "BENCH_ROUNDS must be a positive integer"
is_uint "$MAX_TOKENS" && ((MAX_TOKENS > 0)) || die "BENCH_MAX_TOKENS must be a positive integer"
is_uint "$WAIT_IDLE" || die "BENCH_WAIT_IDLE must be a non-negative integer (seconds)"
is_uint "$NOISY_RETRIES" || die "BENCH_NOISY_RETRIES must be a non-negative integer"
for c in $CONCURRENCY; do
    is_uint "$c" && ((c > 0)) || die "BENCH_CONCURRENCY: '$c' is not a positive integer"
done
[[ -n ${CONCURRENCY// /} ]] || die "BENCH_CONCURRENCY is empty"
[[ $UPSTREAM == tcp || $UPSTREAM == unix ]] || die "BENCH_UPSTREAM must be tcp or unix"
[[ $STORE == memory || $STORE == redis ]] || die "BENCH_STORE must be memory or redis"
[[ $KEY_LIMITS == 0 || $KEY_LIMITS == 1 ]] || die "BENCH_KEY_LIMITS must be 0 or 1"
[[ -z $GATEWAY_WORKERS ]] || { is_uint "$GATEWAY_WORKERS" && ((GATEWAY_WORKERS > 0)); } ||
    die "BENCH_GATEWAY_WORKERS must be a positive integer"

# --- tools -------------------------------------------------------------------------------------

command -v curl >/dev/null || die "curl is required"
if [[ $REFERENCE_NGINX == 1 ]]; then
    command -v nginx >/dev/null || die "BENCH_REFERENCE_NGINX=1 needs nginx (apt-get install nginx-light)"
fi
if ! command -v wrk >/dev/null; then
    log "wrk not found; installing it with apt-get"
    command -v apt-get >/dev/null || die "wrk is missing and there is no apt-get: install wrk by hand"
    SUDO=()
    if (($(id -u) != 0)); then
        command -v sudo >/dev/null || die "installing wrk needs root or sudo"
        SUDO=(sudo)
    fi
    "${SUDO[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq wrk >&2
fi

if [[ $SKIP_BUILD != 1 ]]; then
    log "building the $PROFILE binaries (may wait for the cargo lock)"
    # The gateway embeds its default plugins, built for wasm32-wasip2.
    if command -v rustup >/dev/null 2>&1; then
        rustup target add wasm32-wasip2 >/dev/null 2>&1 || echo "warning: could not add the wasm32-wasip2 target" >&2
    fi
    cargo build --profile "$PROFILE" -p garage-gateway-bin -p garage-sim-engine -p garage-hyper-floor >&2
fi
[[ -x $BIN/gateway && -x $BIN/sim-engine ]] || die "no $PROFILE binaries in $BIN"
[[ $REFERENCE_HYPER != 1 || -x $BIN/hyper-floor ]] || die "no hyper-floor binary in $BIN"

CLK_TCK=$(getconf CLK_TCK)
NPROC=$(nproc)

# --- processes and cleanup ---------------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/garage-bench.XXXXXX")
ENGINE_PID=""
# BENCH_UPSTREAM=unix: the engine on a Unix socket, for the gateway and nginx.
UDS_ENGINE_PID=""
GATEWAY_PID=""
# BENCH_PLUGINS=both: the gateway with the default policies.
POLICIES_PID=""
REDIS_PID=""
NGINX_PID=""
HYPER_PID=""

stop() { # pid name: SIGTERM, wait up to 5 s, then SIGKILL
    local pid=$1 name=$2 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name ($pid) ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop "$NGINX_PID" nginx
    stop "$HYPER_PID" hyper-floor
    stop "$GATEWAY_PID" gateway
    stop "$POLICIES_PID" "gateway with policies"
    stop "$ENGINE_PID" sim-engine
    stop "$UDS_ENGINE_PID" "sim-engine (unix socket)"
    stop "$REDIS_PID" redis-server
    if ((status != 0)) && [[ -d $WORK ]]; then
        for f in "$WORK"/*.log; do
            [[ -s $f ]] || continue
            log "--- last lines of $(basename "$f") ---"
            tail -n 20 "$f" >&2
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Polls `cmd...` every 0.1 s until it succeeds, for at most `timeout` seconds; fails early when
# process `pid` has died.
wait_until() { # description timeout_s pid cmd...
    local what=$1 timeout=$2 pid=$3
    shift 3
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        kill -0 "$pid" 2>/dev/null || die "$what: the process exited"
        ((SECONDS < deadline)) || die "$what: not ready after ${timeout} s"
        sleep 0.1
    done
}

http_ok() { # url [curl args...]: true when the answer is 2xx
    local url=$1
    shift
    curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null
}

# The TCP port `pid` listens on, from procfs (no dependency on ss or lsof).
listening_port() { # pid
    local pid=$1 fd link inodes=" "
    for fd in /proc/"$pid"/fd/*; do
        link=$(readlink "$fd" 2>/dev/null) || continue
        [[ $link == socket:\[*\] ]] && inodes+="${link:8:-1} "
    done
    local sl local_addr rem st rest inode _
    while read -r sl local_addr rem st _ _ _ _ _ inode rest; do
        if [[ $st == 0A && $inodes == *" $inode "* ]]; then
            echo $((16#${local_addr##*:}))
            return 0
        fi
    done < <(tail -n +2 /proc/net/tcp)
    return 1
}

engine_addr_known() {
    ENGINE_ADDR=$(sed -n 's|^sim-engine listening on http://\([0-9.]*:[0-9]*\).*|\1|p' "$WORK/engine.log")
    [[ -n $ENGINE_ADDR ]]
}

# --- start the engine and the gateway ----------------------------------------------------------

log "starting sim-engine (no delays, $MAX_TOKENS tokens per answer)"
ENGINE_ARGS=(--model "$MODEL" --ttft-ms 0 --tokens-per-sec 0 --default-max-tokens "$MAX_TOKENS"
    --max-num-seqs 4096)
RUST_LOG=warn "$BIN/sim-engine" --listen 127.0.0.1:0 "${ENGINE_ARGS[@]}" >"$WORK/engine.log" 2>&1 &
ENGINE_PID=$!
ENGINE_ADDR=""
wait_until "sim-engine address" 20 "$ENGINE_PID" engine_addr_known
wait_until "sim-engine /health" 20 "$ENGINE_PID" http_ok "http://$ENGINE_ADDR/health"
ENGINE_URL="http://$ENGINE_ADDR"
ENGINE_SOCKET=""
if [[ $UPSTREAM == unix ]]; then
    ENGINE_SOCKET=$WORK/engine.sock
    log "starting a second sim-engine on the Unix socket $ENGINE_SOCKET"
    RUST_LOG=warn "$BIN/sim-engine" --uds "$ENGINE_SOCKET" "${ENGINE_ARGS[@]}" \
        >"$WORK/uds-engine.log" 2>&1 &
    UDS_ENGINE_PID=$!
    wait_until "sim-engine on $ENGINE_SOCKET" 20 "$UDS_ENGINE_PID" \
        http_ok http://localhost/health --unix-socket "$ENGINE_SOCKET"
fi

ADMIN_TOKEN="bench-admin-$RANDOM$RANDOM$RANDOM"
# BENCH_PLUGINS=hot: only the hot-path slots (the default router and rate limiter, loaded from
# the files the build made); no meter or reward competing for the cores.
HOT_FILES=""
if [[ "$PLUGINS" == hot ]]; then
    WASM_DIR=$TARGET_DIR/wasm-plugins/wasm32-wasip2/release
    [[ -f $WASM_DIR/router_least_loaded.wasm && -f $WASM_DIR/rate_limiter.wasm ]] ||
        die "BENCH_PLUGINS=hot needs the plugins built in $WASM_DIR (any cargo build of the gateway)"
    HOT_FILES="
[plugins.files.router]
path = \"$WASM_DIR/router_least_loaded.wasm\"

[plugins.files.rate-limiter]
path = \"$WASM_DIR/rate_limiter.wasm\""
fi

free_port() { # a loopback port nothing listens on (nginx needs one named in its config)
    local port i low=32768 _high
    # Below the kernel's ephemeral range: a port taken from inside it could be handed to one of
    # the many outgoing connections made before nginx binds it (it happened: nginx failed with
    # "Address already in use").
    read -r low _high </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    ((low > 11024)) || low=32768
    for ((i = 0; i < 100; i++)); do
        port=$((10000 + RANDOM % (low - 10000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    return 1
}

# BENCH_STORE=redis: a redis-server of its own, each gateway on a database of its own (a
# gateway's plugin slots live in its store: on one database the bare gateway would load the
# other's plugins).
REDIS_URL=""
GATEWAYS_STARTED=0
if [[ $STORE == redis ]]; then
    command -v redis-server >/dev/null || die "BENCH_STORE=redis needs redis-server (apt-get install redis-server)"
    REDIS_PORT=$(free_port) || die "no free port for redis-server"
    log "starting redis-server on port $REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$WORK" >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    redis_up() { (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; }
    wait_until "redis-server" 20 "$REDIS_PID" redis_up
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
fi

# The API key each gateway makes: with BENCH_KEY_LIMITS=1, limits far above what the run sends.
KEY_REQUEST='{"name":"bench"}'
[[ $KEY_LIMITS == 1 ]] &&
    KEY_REQUEST='{"name":"bench","metadata":{"rpm":100000000,"tpm":1000000000}}'

# Starts a gateway in front of the engine and makes it an API key; sets STARTED_PID,
# STARTED_URL and STARTED_KEY.
start_gateway() { # name default_plugins(true|false) extra_toml
    local name=$1 default_plugins=$2 extra=$3 i transport store=memory
    local key_secret=""
    if [[ -n $REDIS_URL ]]; then
        store="$REDIS_URL/$GATEWAYS_STARTED"
        # A Redis store needs the secret API keys are hashed with (every replica alike).
        key_secret="key_secret = \"bench-key-secret-$RANDOM$RANDOM$RANDOM$RANDOM\""
    fi
    GATEWAYS_STARTED=$((GATEWAYS_STARTED + 1))
    cat >"$WORK/$name.toml" <<EOF
listen = "127.0.0.1:0"
store = "$store"
shutdown_grace_secs = 2
default_plugins = $default_plugins

[auth]
admin_token = "$ADMIN_TOKEN"
$key_secret
$extra
EOF
    for i in $(seq 1 "$UPSTREAMS"); do
        if [[ $UPSTREAM == unix ]]; then
            transport="base_url = \"http://localhost/v1\"
unix_socket = \"$ENGINE_SOCKET\""
        else
            transport="base_url = \"$ENGINE_URL/v1\""
        fi
        cat >>"$WORK/$name.toml" <<EOF

[[upstreams]]
name = "sim-$i"
$transport
models = ["$MODEL"]
health_path = "/health"
EOF
    done

    log "starting the $name gateway (default_plugins = $default_plugins) in front of ${ENGINE_SOCKET:-$ENGINE_URL}"
    # GARAGE_* variables would override the file; the benchmark must not inherit any.
    local garage_vars unsets=() workers=() v
    mapfile -t garage_vars < <(compgen -e | grep '^GARAGE_' || true)
    for v in "${garage_vars[@]}"; do unsets+=(-u "$v"); done
    [[ -n $GATEWAY_WORKERS ]] && workers=(--worker-threads "$GATEWAY_WORKERS")
    env "${unsets[@]}" -u TOKIO_WORKER_THREADS RUST_LOG="${BENCH_GATEWAY_LOG:-warn}" "$BIN/gateway" serve \
        --config "$WORK/$name.toml" "${workers[@]}" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    STARTED_PORT=""
    wait_until "$name gateway listening socket" 20 "$STARTED_PID" started_port_known
    STARTED_URL="http://127.0.0.1:$STARTED_PORT"
    wait_until "$name gateway /ready" 30 "$STARTED_PID" http_ok "$STARTED_URL/ready"

    local created
    created=$(curl -fsS --max-time 5 -X POST "$STARTED_URL/admin/keys" \
        -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' \
        -d "$KEY_REQUEST") || die "POST /admin/keys failed on the $name gateway"
    STARTED_KEY=$(sed -n 's/.*"key"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' <<<"$created")
    [[ -n $STARTED_KEY ]] || die "no key in the POST /admin/keys response: $created"
}
started_port_known() {
    STARTED_PORT=$(listening_port "$STARTED_PID") && [[ -n $STARTED_PORT ]]
}

# BENCH_PLUGINS=both: two gateways side by side in one run, the bare one (`gateway` rows) and
# one with the four default policies (`policies` rows), against the same engine.
DEFAULT_PLUGINS=false
[[ $PLUGINS == 1 ]] && DEFAULT_PLUGINS=true
start_gateway gateway "$DEFAULT_PLUGINS" "$HOT_FILES"
GATEWAY_PID=$STARTED_PID GATEWAY_URL=$STARTED_URL API_KEY=$STARTED_KEY
POLICIES_URL="" POLICIES_KEY=""
if [[ $PLUGINS == both ]]; then
    start_gateway policies true "${BENCH_POLICIES_TOML:-}"
    POLICIES_PID=$STARTED_PID POLICIES_URL=$STARTED_URL POLICIES_KEY=$STARTED_KEY
fi
export BENCH_KEY=$API_KEY BENCH_MODEL=$MODEL

# Each combination answers correctly before any load is measured.
smoke() { # base_url stream [api_key]
    local url=$1 stream=$2 key=${3:-$API_KEY} body
    body=$(curl -fsS --max-time 5 "$url/v1/chat/completions" \
        -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        -d "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":$stream}") ||
        die "smoke test failed: $url stream=$stream"
    if [[ $stream == true ]]; then
        [[ $body == *"data: [DONE]"* ]] || die "smoke test: no [DONE] from $url: $body"
    else
        [[ $body == *'"choices"'* ]] || die "smoke test: unexpected answer from $url: $body"
    fi
}
for u in "$ENGINE_URL" "$GATEWAY_URL"; do
    smoke "$u" false
    smoke "$u" true
done
if [[ -n $POLICIES_URL ]]; then
    smoke "$POLICIES_URL" false "$POLICIES_KEY"
    smoke "$POLICIES_URL" true "$POLICIES_KEY"
fi
log "engine $ENGINE_URL (pid $ENGINE_PID), gateway $GATEWAY_URL (pid $GATEWAY_PID): ready"

NGINX_URL=""
MODES="direct gateway"
[[ -n $POLICIES_URL ]] && MODES="$MODES policies"
if [[ $REFERENCE_NGINX == 1 ]]; then
    NGINX_PORT=$(free_port) || die "no free port for nginx"
    NGINX_UPSTREAM=$ENGINE_ADDR
    [[ $UPSTREAM == unix ]] && NGINX_UPSTREAM=unix:$ENGINE_SOCKET
    mkdir -p "$WORK/nginx"
    # The usual reverse-proxy setup for an SSE API: keep-alive to the upstream, no buffering.
    cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes auto;
# Workers as this user, not nobody: they must reach the engine's socket in \$WORK (0700).
user $(id -un);
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    upstream engine { server $NGINX_UPSTREAM; keepalive 256; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
    log "starting nginx (reference proxy) on port $NGINX_PORT"
    nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' >>"$WORK/nginx.log" 2>&1 &
    NGINX_PID=$!
    NGINX_URL="http://127.0.0.1:$NGINX_PORT"
    wait_until "nginx" 20 "$NGINX_PID" http_ok "$NGINX_URL/health"
    smoke "$NGINX_URL" false
    smoke "$NGINX_URL" true
    MODES="$MODES nginx"
fi
HYPER_URL=""
if [[ $REFERENCE_HYPER == 1 ]]; then
    log "starting hyper-floor (reference proxy)"
    "$BIN/hyper-floor" --listen 127.0.0.1:0 --upstream "$ENGINE_URL" >"$WORK/hyper.log" 2>&1 &
    HYPER_PID=$!
    hyper_addr_known() {
        HYPER_URL=$(sed -n 's|^hyper-floor listening on \(http://[0-9.]*:[0-9]*\).*|\1|p' "$WORK/hyper.log")
        [[ -n $HYPER_URL ]]
    }
    wait_until "hyper-floor address" 20 "$HYPER_PID" hyper_addr_known
    wait_until "hyper-floor" 20 "$HYPER_PID" http_ok "$HYPER_URL/health"
    smoke "$HYPER_URL" false
    smoke "$HYPER_URL" true
    MODES="$MODES hyper"
fi

# --- measurement -------------------------------------------------------------------------------

proc_ticks() { # pid... -> utime+stime of these processes (all their threads), in clock ticks
    local pid s total=0
    for pid in "$@"; do
        s=$(<"/proc/$pid/stat") || continue
        s=${s##*) }
        # shellcheck disable=SC2086
        set -- $s
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

nginx_pids() { # master and workers
    [[ -n $NGINX_PID ]] || return 0
    # shellcheck disable=SC2046
    echo "$NGINX_PID" $(pgrep -P "$NGINX_PID" || true)
}

rss_kb() { # pid... -> their resident set sizes together, KiB (VmRSS)
    local pid total=0 kb
    for pid in "$@"; do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

children_ticks() { # cutime+cstime of this shell: every child it has waited for (here: wrk)
    local s
    s=$(<"/proc/$$/stat")
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $((${14} + ${15}))
}

system_ticks() { # "busy total" over all CPUs, from /proc/stat
    local _cpu user nice sys idle iowait irq softirq steal _rest
    read -r _cpu user nice sys idle iowait irq softirq steal _rest </proc/stat
    local busy=$((user + nice + sys + irq + softirq + steal))
    echo "$busy $((busy + idle + iowait))"
}

field() { # name line -> value of name=... in a BENCH_RESULT line
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"
}

run_wrk() { # url script connections duration_s output_file
    local threads=$THREADS
    ((threads > $3)) && threads=$3
    wrk -t"$threads" -c"$3" -d"$4"s --timeout 10s --latency -s "$2" "$1" >"$5" 2>&1
}

ROWS=()
plugin_calls() { # gateway_url -> "slot=calls:seconds ..." totals of its plugin call histogram
    curl -s "$1/metrics" | awk '
        /^garage_plugin_call_duration_seconds_(count|sum)\{/ {
            if (match($0, /slot="[^"]+"/)) {
                slot = substr($0, RSTART + 6, RLENGTH - 7)
                if ($0 ~ /_count\{/) n[slot] += $NF; else t[slot] += $NF
            }
        }
        END { for (s in n) printf "%s=%d:%.9f ", s, n[s], t[s] }'
}

# BENCH_STORE=redis: the server's command counts, "command=calls ...", from INFO commandstats
# (every database of the server: the gateway not under load adds its few background commands).
redis_commands() {
    redis-cli -p "$REDIS_PORT" INFO commandstats |
        sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1=\2/p' | tr '\n' ' '
}
redis_per_request() { # before after requests -> "N.NN (command=per-request, ... the largest first)"
    awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN {
        k = split(a, x, " "); for (i = 1; i <= k; i++) { split(x[i], kv, "="); c0[kv[1]] = kv[2] }
        k = split(b, y, " ")
        for (i = 1; i <= k; i++) {
            split(y[i], kv, "="); d = kv[2] - c0[kv[1]]
            # INFO is the benchmark asking, not a gateway.
            if (d > 0 && kv[1] != "info") { per[kv[1]] = d / n; total += d / n }
        }
        printf "%.2f (", total; sep = ""
        while (1) {
            best = ""; for (c in per) if (best == "" || per[c] > per[best]) best = c
            if (best == "") break
            printf "%s%s %.2f", sep, best, per[best]; sep = ", "; delete per[best]
        }
        printf ")"
    }'
}
# Per gateway row on Redis: "mode stream conc per_request".
REDIS_NOTES=()

# Plugin calls per second in each gateway row (BENCH_PLUGINS=1): "stream conc slot=calls/s ...".
PLUGIN_RATES=()

measure() { # mode(direct|gateway) stream(no|yes) concurrency
    local mode=$1 stream=$2 conc=$3 url script
    case $mode in
        direct) url=$ENGINE_URL ;;
        gateway) url=$GATEWAY_URL ;;
        policies) url=$POLICIES_URL ;;
        nginx) url=$NGINX_URL ;;
        hyper) url=$HYPER_URL ;;
    esac
    [[ $stream == yes ]] && script=bench/chat_stream.lua || script=bench/chat.lua
    kill -0 "$ENGINE_PID" 2>/dev/null || die "sim-engine died"
    [[ -z $UDS_ENGINE_PID ]] || kill -0 "$UDS_ENGINE_PID" 2>/dev/null || die "sim-engine (unix socket) died"
    kill -0 "$GATEWAY_PID" 2>/dev/null || die "gateway died"
    [[ -z $POLICIES_PID ]] || kill -0 "$POLICIES_PID" 2>/dev/null || die "gateway with policies died"
    [[ -z $NGINX_PID ]] || kill -0 "$NGINX_PID" 2>/dev/null || die "nginx died"
    [[ -z $HYPER_PID ]] || kill -0 "$HYPER_PID" 2>/dev/null || die "hyper-floor died"

    log "$mode stream=$stream c=$conc: ${WARMUP}s warm-up, ${DURATION}s measured"
    # Each gateway has its own API key.
    if [[ $mode == policies ]]; then export BENCH_KEY=$POLICIES_KEY; else export BENCH_KEY=$API_KEY; fi
    if ((WARMUP > 0)); then
        run_wrk "$url" "$script" "$conc" "$WARMUP" "$WORK/warmup.out" ||
            die "wrk warm-up failed: $(cat "$WORK/warmup.out")"
    fi

    local ngx gw0 ng0 hy0 en0 ch0 sys0 gw1 ng1 hy1 en1 ch1 sys1 pg0 pg1
    # shellcheck disable=SC2207
    ngx=($(nginx_pids))
    # The gateway rows whose plugin calls are counted: with BENCH_PLUGINS=1 or hot the
    # gateway's, with both the policies gateway's.
    local calls_url=""
    [[ $mode == gateway && $PLUGINS != 0 && $PLUGINS != both ]] && calls_url=$GATEWAY_URL
    [[ $mode == policies ]] && calls_url=$POLICIES_URL
    local calls0=""
    [[ -n $calls_url ]] && calls0=$(plugin_calls "$calls_url")
    local redis0=""
    [[ -n $REDIS_URL && $mode != direct ]] && redis0=$(redis_commands)
    gw0=$(proc_ticks "$GATEWAY_PID")
    # shellcheck disable=SC2086 # no pid: no ticks
    pg0=$(proc_ticks $POLICIES_PID)
    ng0=$(proc_ticks "${ngx[@]}")
    # shellcheck disable=SC2086 # no pid: no ticks
    hy0=$(proc_ticks $HYPER_PID)
    # shellcheck disable=SC2086 # the engine on a socket, when there is one
    en0=$(proc_ticks "$ENGINE_PID" $UDS_ENGINE_PID)
    ch0=$(children_ticks)
    sys0=$(system_ticks)
    run_wrk "$url" "$script" "$conc" "$DURATION" "$WORK/wrk.out" ||
        die "wrk failed: $(cat "$WORK/wrk.out")"
    gw1=$(proc_ticks "$GATEWAY_PID")
    # shellcheck disable=SC2086
    pg1=$(proc_ticks $POLICIES_PID)
    # Memory under load: the proxy's resident set at the end of the measured run.
    local rss=0
    case $mode in
        gateway) rss=$(rss_kb "$GATEWAY_PID") ;;
        policies) rss=$(rss_kb "$POLICIES_PID") ;;
        nginx) rss=$(rss_kb "${ngx[@]}") ;;
        # shellcheck disable=SC2086
        hyper) rss=$(rss_kb $HYPER_PID) ;;
    esac
    ng1=$(proc_ticks "${ngx[@]}")
    # shellcheck disable=SC2086
    hy1=$(proc_ticks $HYPER_PID)
    # shellcheck disable=SC2086
    en1=$(proc_ticks "$ENGINE_PID" $UDS_ENGINE_PID)
    ch1=$(children_ticks)
    sys1=$(system_ticks)
    local redis1=""
    [[ -n $redis0 ]] && redis1=$(redis_commands)
    if [[ -n $calls_url ]]; then
        local calls1 rates
        calls1=$(plugin_calls "$calls_url")
        # Per slot: calls per second, and the mean time of a call (instance and call, as the
        # request waits for it) over the row.
        rates=$(awk -v a="$calls0" -v b="$calls1" -v d="$DURATION" 'BEGIN {
            n = split(a, x, " ")
            for (i = 1; i <= n; i++) { split(x[i], kv, "[=:]"); c0[kv[1]] = kv[2]; t0[kv[1]] = kv[3] }
            n = split(b, y, " ")
            for (i = 1; i <= n; i++) {
                split(y[i], kv, "[=:]"); calls = kv[2] - c0[kv[1]]
                mean = calls > 0 ? (kv[3] - t0[kv[1]]) / calls * 1e6 : 0
                printf "%s=%.0f/s (%.1f µs) ", kv[1], calls / d, mean
            }
        }')
        PLUGIN_RATES+=("$mode	$stream	$conc	$rates")
        log "  plugin calls/s: $rates"
    fi

    local line
    line=$(grep '^BENCH_RESULT ' "$WORK/wrk.out" | tail -n 1) ||
        die "no BENCH_RESULT line in the wrk output: $(cat "$WORK/wrk.out")"
    local requests rps p50 p99 errors
    requests=$(field requests "$line")
    rps=$(field rps "$line")
    p50=$(field p50_us "$line")
    p99=$(field p99_us "$line")
    errors=0
    for e in err_connect err_read err_write err_status err_timeout; do
        errors=$((errors + $(field "$e" "$line")))
    done
    ((requests > 0)) || die "$mode stream=$stream c=$conc: no request completed"
    if [[ -n $redis1 ]]; then
        local per_request
        per_request=$(redis_per_request "$redis0" "$redis1" "$requests")
        REDIS_NOTES+=("$mode	$stream	$conc	$per_request")
        log "  redis commands per request: $per_request"
    fi
    local sb0 st0 sb1 st1
    read -r sb0 st0 <<<"$sys0"
    read -r sb1 st1 <<<"$sys1"
    local gw=$((gw1 - gw0)) pg=$((pg1 - pg0)) ng=$((ng1 - ng0)) hy=$((hy1 - hy0)) en=$((en1 - en0)) ch=$((ch1 - ch0)) proxy=0
    [[ $mode == gateway ]] && proxy=$gw
    [[ $mode == policies ]] && proxy=$pg
    [[ $mode == nginx ]] && proxy=$ng
    [[ $mode == hyper ]] && proxy=$hy
    # One row, tab-separated: mode stream conc requests rps p50_us p99_us errors proxy_ticks
    #   engine_ticks wrk_ticks other_ticks (busy, less every benchmark process) total_ticks
    #   proxy_rss_kb
    ROWS+=("$mode	$stream	$conc	$requests	$rps	$p50	$p99	$errors	$proxy	$en	$ch	$((sb1 - sb0 - gw - pg - ng - hy - en - ch))	$((st1 - st0))	$rss")
    log "  -> $(printf '%.0f' "$rps") req/s, p50 ${p50} us, p99 ${p99} us, errors $errors"
}

compilers_running() { # how many compiler processes run on the machine now
    ps -eo comm= | grep -cE '^(cargo|rustc|cc1|cc1plus|ld|rust-lld)$' || true
}
wait_for_compilers() { # max_seconds
    local deadline=$((SECONDS + $1))
    while (($(compilers_running) > 0 && SECONDS < deadline)); do
        log "compilers running ($(compilers_running)); waiting up to $((deadline - SECONDS)) s more"
        sleep 5
    done
}
is_noisy() { # row: true when other processes used over NOISY_PERCENT of the machine
    local ot st
    IFS=$'\t' read -r _ _ _ _ _ _ _ _ _ _ _ ot st _ <<<"$1"
    ((st > 0 && ot * 100 > st * NOISY_PERCENT))
}
# Per group and mode, every round's req/s and proxy CPU, for the report (BENCH_ROUNDS > 1).
ROUND_NOTES=()
keep_median_rounds() { # first_row_of_group: keeps, per mode, the round with the median req/s
    local first=$1 mode kept=() rows sorted note
    for mode in $MODES; do
        rows=()
        for row in "${ROWS[@]:first}"; do
            [[ ${row%%$'\t'*} == "$mode" ]] && rows+=("$row")
        done
        # Sorted by req/s (field 5); the middle one (the lower middle for an even count).
        mapfile -t sorted < <(printf '%s\n' "${rows[@]}" | sort -t $'\t' -k5,5g)
        kept+=("${sorted[$(((${#sorted[@]} - 1) / 2))]}")
        note=$(printf '%s\n' "${rows[@]}" | awk -F'\t' -v tck="$CLK_TCK" '
            { printf "%s%.0f", (NR > 1 ? ", " : ""), $5
              if ($9 > 0) printf " (%.1f µs)", $9 * 1e6 / tck / $4 }')
        ROUND_NOTES+=("$mode, stream $stream, c=$conc: $note")
    done
    ROWS=("${ROWS[@]:0:first}" "${kept[@]}")
}
((WAIT_IDLE > 0)) && wait_for_compilers "$WAIT_IDLE"
RETRIED=0
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# Memory at rest, before any load (after start-up and the smoke requests).
idle_rss() { # -> "gateway <KiB> [policies <KiB>]"
    printf 'gateway %s' "$(rss_kb "$GATEWAY_PID")"
    [[ -z $POLICIES_PID ]] || printf ' policies %s' "$(rss_kb "$POLICIES_PID")"
}
IDLE_RSS_BEFORE=$(idle_rss)
BUSY_BEFORE=$(compilers_running)
for stream in no yes; do
    for conc in $CONCURRENCY; do
        # The rows of one stream mode and concurrency back to back, so that a disturbance hits
        # them alike.
        attempt=0
        while :; do
            first=${#ROWS[@]}
            first_rates=${#PLUGIN_RATES[@]}
            first_redis=${#REDIS_NOTES[@]}
            for ((round = 1; round <= ROUNDS; round++)); do
                for mode in $MODES; do
                    measure "$mode" "$stream" "$conc"
                done
            done
            noisy=0
            for row in "${ROWS[@]:first}"; do
                if is_noisy "$row"; then noisy=1; fi
            done
            ((noisy && attempt < NOISY_RETRIES)) || break
            attempt=$((attempt + 1))
            RETRIED=$((RETRIED + 1))
            log "other processes used over $NOISY_PERCENT % of the machine: measuring this group again ($attempt/$NOISY_RETRIES)"
            ROWS=("${ROWS[@]:0:first}")
            PLUGIN_RATES=("${PLUGIN_RATES[@]:0:first_rates}")
            REDIS_NOTES=("${REDIS_NOTES[@]:0:first_redis}")
            wait_for_compilers 60
        done
        ((ROUNDS > 1)) && keep_median_rounds "$first"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
# And at rest again after it: what the load left resident.
sleep 3
IDLE_RSS_AFTER=$(idle_rss)

# --- report ------------------------------------------------------------------------------------

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain -- gateway sim-engine Cargo.toml Cargo.lock 2>/dev/null | wc -l)
if ((DIRTY > 0)); then
    # Identifies the exact working tree measured: others may be editing while this runs.
    DIFF_ID=$(git diff HEAD -- gateway sim-engine Cargo.toml Cargo.lock | sha256sum | cut -c1-12)
    COMMIT="$COMMIT + uncommitted changes in $DIRTY file(s) of gateway/, sim-engine/, Cargo.* (diff sha256 $DIFF_ID)"
fi
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
[[ -n $CPU_MODEL ]] || CPU_MODEL=unknown
# `wrk -v` prints its version, then its usage, and exits non-zero.
WRK_VERSION=$({ wrk -v 2>&1 || true; } | awk 'NR == 1 {print $1, $2}')

report() {
    echo "## Gateway overhead benchmark"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Commit: $COMMIT, cargo profile $PROFILE"
    if [[ $SKIP_BUILD == 1 ]]; then
        echo "- Binaries not rebuilt (BENCH_SKIP_BUILD=1): gateway built $(date -u -r "$BIN/gateway" '+%Y-%m-%d %H:%M UTC'), which may predate the tree above"
    fi
    echo "- Machine: $NPROC CPU(s), $CPU_MODEL, Linux $(uname -r)"
    echo "- Load average (1/5/15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER; compiler processes at start: $BUSY_BEFORE"
    if [[ $PLUGINS == both ]]; then
        echo "- Gateways (BENCH_PLUGINS=both): \`gateway\` rows default_plugins = false, \`policies\` rows the four default plugins; each with $UPSTREAMS upstream entr(y|ies) for the one engine (BENCH_UPSTREAMS)"
    else
        echo "- Gateway: default_plugins = $DEFAULT_PLUGINS (BENCH_PLUGINS=$PLUGINS), $UPSTREAMS upstream entr(y|ies) for the one engine (BENCH_UPSTREAMS)"
    fi
    echo "- Gateway worker threads (BENCH_GATEWAY_WORKERS): ${GATEWAY_WORKERS:-one per CPU}"
    if [[ $STORE == redis ]]; then
        echo "- Store (BENCH_STORE=redis): redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on loopback, a database per gateway"
    else
        echo "- Store (BENCH_STORE=memory): the embedded store"
    fi
    if [[ $KEY_LIMITS == 1 ]]; then
        echo "- API keys (BENCH_KEY_LIMITS=1): rpm 100000000, tpm 1000000000 in their metadata, never reached: the rate limiter reserves from its counters on every request"
    else
        echo "- API keys (BENCH_KEY_LIMITS=0): no limits, so the default rate limiter reserves nothing"
    fi
    if [[ $UPSTREAM == unix ]]; then
        echo "- Upstream (BENCH_UPSTREAM=unix): the gateway and nginx reach a second, identical engine over a Unix domain socket; direct rows and hyper-floor use TCP"
    else
        echo "- Upstream (BENCH_UPSTREAM=tcp): every proxy reaches the engine over loopback TCP"
    fi
    echo "- Load: $WRK_VERSION, up to $THREADS thread(s), ${DURATION} s measured after ${WARMUP} s warm-up per row," \
        "$ROUNDS round(s) per group, POST /v1/chat/completions (2 messages), sim-engine with no delays and" \
        "$MAX_TOKENS tokens per answer"
    echo
    echo "| mode | stream | conc | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s vs direct | gateway CPU µs/req | engine CPU µs/req | wrk CPU µs/req | other CPU % | errors | proxy RSS MB |"
    echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    local row
    for row in "${ROWS[@]}"; do
        local mode stream conc requests rps p50 p99 errors gw en ch ot st rss
        IFS=$'\t' read -r mode stream conc requests rps p50 p99 errors gw en ch ot st rss <<<"$row"
        local d_rps="" d_p50="" d_p99=""
        if [[ $mode != direct ]]; then
            local d
            for d in "${ROWS[@]}"; do
                local dm ds dc _r drps dp50 dp99 _rest
                IFS=$'\t' read -r dm ds dc _r drps dp50 dp99 _rest <<<"$d"
                if [[ $dm == direct && $ds == "$stream" && $dc == "$conc" ]]; then
                    d_rps=$drps d_p50=$dp50 d_p99=$dp99
                fi
            done
        fi
        awk -v mode="$mode" -v stream="$stream" -v conc="$conc" -v n="$requests" -v rps="$rps" \
            -v p50="$p50" -v p99="$p99" -v err="$errors" -v gw="$gw" -v en="$en" -v ch="$ch" \
            -v ot="$ot" -v st="$st" -v tck="$CLK_TCK" -v rss="$rss" \
            -v drps="$d_rps" -v dp50="$d_p50" -v dp99="$d_p99" 'BEGIN {
                us = 1e6 / tck
                other = st > 0 ? 100 * ot / st : 0
                if (other < 0) other = 0
                if (mode != "direct" && drps != "") {
                    add50 = sprintf("%+.3f", (p50 - dp50) / 1000)
                    add99 = sprintf("%+.3f", (p99 - dp99) / 1000)
                    ratio = sprintf("%.2f", rps / drps)
                    gwcpu = sprintf("%.1f", gw * us / n)
                } else {
                    add50 = "–"; add99 = "–"; ratio = "–"; gwcpu = "–"
                }
                mem = mode == "direct" ? "–" : sprintf("%.0f", rss / 1024)
                printf "| %s | %s | %d | %.0f | %.3f | %.3f | %s | %s | %s | %s | %.1f | %.1f | %.0f | %d | %s |\n",
                    mode, stream, conc, rps, p50 / 1000, p99 / 1000, add50, add99, ratio, gwcpu,
                    en * us / n, ch * us / n, other, err, mem
            }'
    done
    echo
    echo "Added latency is a proxied row minus the direct row of the same stream mode and" \
        "concurrency. CPU columns: user+system time from /proc over the measured ${DURATION} s," \
        "per completed request (clock tick: $((1000 / CLK_TCK)) ms). \"other CPU %\" is the share of" \
        "all $NPROC CPUs used by anything else (other processes, interrupts) during the row."
    local noisy=0
    for row in "${ROWS[@]}"; do
        if is_noisy "$row"; then noisy=$((noisy + 1)); fi
    done
    if ((${#ROUND_NOTES[@]} > 0)); then
        echo
        echo "Each row is the median of $ROUNDS rounds (by req/s; the modes alternating within a" \
            "group). Every round, in order: req/s (proxy CPU per request):"
        echo
        local note
        for note in "${ROUND_NOTES[@]}"; do
            echo "- $note"
        done
    fi
    if ((RETRIED > 0)); then
        echo
        echo "$RETRIED group(s) of rows were measured again because other processes were busy."
    fi
    if ((noisy > 0)); then
        echo
        echo "**Warning: in $noisy row(s) something else used over $NOISY_PERCENT % of the machine" \
            "(\"other CPU %\"); those numbers are skewed. Rerun on a quiet machine.**"
    fi
    if [[ $REFERENCE_NGINX == 1 ]]; then
        echo
        echo "nginx rows: nginx $(nginx -v 2>&1 | sed 's|.*nginx/||') as a reverse proxy in front of the" \
            "same engine (keep-alive upstream, proxy_buffering off), as a yardstick; their" \
            "\"gateway CPU\" column is nginx's (master and workers)."
    fi
    if [[ $REFERENCE_HYPER == 1 ]]; then
        echo
        echo "hyper rows: bench/hyper-floor, a bare reverse proxy on the gateway's HTTP stack" \
            "(hyper server, hyper-util pooled client, tokio, mimalloc) that does nothing else: the" \
            "floor under any gateway built on it. Their \"gateway CPU\" column is hyper-floor's."
    fi
    if ((${#REDIS_NOTES[@]} > 0)); then
        echo
        echo "Redis commands per completed request, every round (INFO commandstats over the row;"
        echo "scripts count as evalsha, plus the commands they run):"
        echo
        echo "| mode | stream | conc | commands per request (by command) |"
        echo "|---|---|--:|---|"
        local rn
        for rn in "${REDIS_NOTES[@]}"; do
            IFS=$'\t' read -r m s c per <<<"$rn"
            echo "| $m | $s | $c | $per |"
        done
    fi
    if ((${#PLUGIN_RATES[@]} > 0)); then
        echo
        echo "Plugin calls per second through the gateway rows, and the mean time of a call (from" \
            "garage_plugin_call_duration_seconds: getting an instance plus the call, what a request" \
            "waits for; the rate limiter is called twice per request, admit and settle):"
        echo
        echo "| mode | stream | conc | calls/s by slot |"
        echo "|---|---|--:|---|"
        local r
        for r in "${PLUGIN_RATES[@]}"; do
            IFS=$'\t' read -r m s c rates <<<"$r"
            echo "| $m | $s | $c | $rates |"
        done
    fi
    echo
    echo "Proxy RSS: VmRSS at the end of each row's measured run (nginx: master and workers)." \
        "At rest, KiB: before the load $IDLE_RSS_BEFORE; 3 s after it $IDLE_RSS_AFTER."
    if [[ -n $POLICIES_PID ]]; then
        echo
        echo "The four default policies against the bare gateway, same run (targets: CPU ≤ 1.5×," \
            "added p99 within +1 ms, RSS under load ≤ 120 MB):"
        echo
        echo "| stream | conc | CPU µs/req bare → policies | ratio | p99 ms bare → policies | RSS MB |"
        echo "|---|--:|--:|--:|--:|--:|"
        local st c
        for st in no yes; do
            for c in $CONCURRENCY; do
                local b="" q=""
                for row in "${ROWS[@]}"; do
                    IFS=$'\t' read -r mode s conc _ <<<"$row"
                    [[ $s == "$st" && $conc == "$c" ]] || continue
                    [[ $mode == gateway ]] && b=$row
                    [[ $mode == policies ]] && q=$row
                done
                [[ -n $b && -n $q ]] || continue
                local bn bp99 bcpu qn qp99 qcpu qrss
                IFS=$'\t' read -r _ _ _ bn _ _ bp99 _ bcpu _ <<<"$b"
                IFS=$'\t' read -r _ _ _ qn _ _ qp99 _ qcpu _ _ _ _ qrss <<<"$q"
                awk -v st="$st" -v c="$c" -v bn="$bn" -v bc="$bcpu" -v bp="$bp99" -v qn="$qn" \
                    -v qc="$qcpu" -v qp="$qp99" -v qr="$qrss" -v tck="$CLK_TCK" 'BEGIN {
                    b = bc * 1e6 / tck / bn; q = qc * 1e6 / tck / qn
                    printf "| %s | %d | %.1f → %.1f | %.2f× | %.3f → %.3f (%+.3f) | %.0f |\n",
                        st, c, b, q, (b > 0 ? q / b : 0), bp / 1000, qp / 1000, (qp - bp) / 1000, qr / 1024
                }'
            done
        done
    fi
    # The stated target, checked at concurrency 16.
    local stream
    for stream in no yes; do
        local g="" d=""
        for row in "${ROWS[@]}"; do
            IFS=$'\t' read -r mode s conc _ <<<"$row"
            [[ $s == "$stream" && $conc == 16 ]] || continue
            case $mode in
                gateway) g=$row ;;
                direct) d=$row ;;
            esac
        done
        [[ -n $g && -n $d ]] || continue
        local grps gp50 gp99 drps dp50 dp99
        IFS=$'\t' read -r _ _ _ _ grps gp50 gp99 _ <<<"$g"
        IFS=$'\t' read -r _ _ _ _ drps dp50 dp99 _ <<<"$d"
        awk -v s="$stream" -v grps="$grps" -v gp50="$gp50" -v gp99="$gp99" \
            -v drps="$drps" -v dp50="$dp50" -v dp99="$dp99" 'BEGIN {
                a50 = (gp50 - dp50) / 1000; a99 = (gp99 - dp99) / 1000; r = grps / drps
                ok = (a50 < 0.3 && a99 < 1.5 && r >= 0.5)
                if (s == "no") { label = "plain" } else { label = "streamed" }
                if (ok) { verdict = "MET" } else { verdict = "MISSED" }
                printf "\nTarget at concurrency 16, %s: added p50 %.3f ms (< 0.3), added p99 %.3f ms (< 1.5), req/s ratio %.2f (>= 0.5): %s\n",
                    label, a50, a99, r, verdict
            }'
    done
}

mkdir -p "$RESULTS_DIR"
report >"$WORK/report.md"
cp "$WORK/report.md" "$RESULTS_DIR/latest.md"
cp "$WORK/report.md" "$RESULTS_DIR/$(date -u +%Y%m%dT%H%M%SZ).md"
cat "$WORK/report.md"
log "report written to bench/results/latest.md"
