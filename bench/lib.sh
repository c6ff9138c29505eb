# Setup shared by bench/instructions.sh and bench/syscalls.sh, which source it after setting
# NAME (the script's, for messages), ROOT, PROFILE and TARGET (gateway or hyper-floor). It sets
# BIN, MODEL and ADMIN, makes WORK (removed on exit unless BENCH_KEEP=1) and stops every process
# in PIDS on exit. BENCH_UPSTREAM=unix (default tcp) puts the engine on a Unix domain socket,
# which the gateway reaches through its upstream's unix_socket (hyper-floor cannot).

BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE
MODEL=sim-llama-3-8b
ADMIN=bench-admin-token-0123456789

die() { echo "$NAME: $*" >&2; exit 1; }
log() { echo "[${NAME%.sh} $(date +%H:%M:%S)] $*" >&2; }

case $TARGET in gateway | hyper-floor) ;; *) die "BENCH_TARGET must be gateway or hyper-floor" ;; esac
UPSTREAM=${BENCH_UPSTREAM:-tcp}
case $UPSTREAM in tcp | unix) ;; *) die "BENCH_UPSTREAM must be tcp or unix" ;; esac
[[ $UPSTREAM == tcp || $TARGET == gateway ]] || die "hyper-floor reaches its upstream over TCP only"

# Builds the binaries of $PROFILE, unless BENCH_SKIP_BUILD=1.
build_unless_skipped() {
    [[ ${BENCH_SKIP_BUILD:-0} == 1 ]] && return 0
    log "building the $PROFILE binaries"
    # The gateway embeds its default plugins, built for wasm32-wasip2.
    if command -v rustup >/dev/null 2>&1; then
        rustup target add wasm32-wasip2 >/dev/null 2>&1 || echo "warning: could not add the wasm32-wasip2 target" >&2
    fi
    cargo build --profile "$PROFILE" -p garage-gateway-bin -p garage-sim-engine -p garage-hyper-floor >&2
}

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ ${BENCH_KEEP:-0} == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT

port_of() { # the port a server printed in its "listening on http://ADDR" line
    local i
    for ((i = 0; i < 100; i++)); do
        if grep -qo 'listening on http://[0-9.]*:[0-9]*' "$1" 2>/dev/null; then
            grep -o 'listening on http://[0-9.]*:[0-9]*' "$1" | head -1 | sed 's/.*://'
            return 0
        fi
        sleep 0.2
    done
    die "no listening address in $1"
}

# Starts the simulated engine with no delays; sets ENGINE (its address), or ENGINE_SOCKET with
# BENCH_UPSTREAM=unix.
start_engine() {
    local listen=(--listen 127.0.0.1:0) i
    [[ $UPSTREAM == unix ]] && ENGINE_SOCKET=$WORK/engine.sock && listen=(--uds "$ENGINE_SOCKET")
    RUST_LOG=warn "$BIN/sim-engine" "${listen[@]}" --model "$MODEL" --ttft-ms 0 \
        --tokens-per-sec 0 --max-num-seqs 4096 >"$WORK/engine.log" 2>&1 &
    PIDS+=($!)
    if [[ $UPSTREAM == unix ]]; then
        for ((i = 0; i < 100; i++)); do
            [[ -S $ENGINE_SOCKET ]] && return 0
            sleep 0.2
        done
        die "the engine did not make $ENGINE_SOCKET"
    fi
    ENGINE=127.0.0.1:$(port_of "$WORK/engine.log")
}

# start_target PORT EXTRA_TOML [LAUNCHER...]: $TARGET on 127.0.0.1:PORT in front of $ENGINE, run
# through LAUNCHER when given (valgrind); the gateway with EXTRA_TOML in its config and an API
# key made. Sets TARGET_PID, URL and KEY (BENCH_KEY, BENCH_MODEL exported for the wrk scripts).
start_target() {
    local port=$1 extra=$2 i
    shift 2
    KEY=unused
    if [[ $TARGET == gateway ]]; then
        local transport
        if [[ $UPSTREAM == unix ]]; then
            transport="base_url = \"http://localhost/v1\""$'\n'"unix_socket = \"$ENGINE_SOCKET\""
        else
            transport="base_url = \"http://$ENGINE/v1\""
        fi
        local default_plugins=false
        [[ ${BENCH_PLUGINS:-0} == 1 ]] && default_plugins=true
        cat >"$WORK/gateway.toml" <<TOML
listen = "127.0.0.1:$port"
default_plugins = $default_plugins
[auth]
admin_token = "$ADMIN"
$extra
TOML
        # BENCH_UPSTREAMS entries for the one engine: a router plugin chooses among them.
        for ((i = 1; i <= ${BENCH_UPSTREAMS:-1}; i++)); do
            cat >>"$WORK/gateway.toml" <<TOML
[[upstreams]]
name = "sim-$i"
$transport
models = ["$MODEL"]
health_path = "/health"
TOML
        done
        RUST_LOG=${BENCH_GATEWAY_LOG:-warn} "$@" "$BIN/gateway" serve --config "$WORK/gateway.toml" \
            >"$WORK/target.log" 2>&1 &
    else
        "$@" "$BIN/hyper-floor" --listen "127.0.0.1:$port" --upstream "http://$ENGINE" \
            >"$WORK/target.log" 2>&1 &
    fi
    TARGET_PID=$!
    PIDS+=($TARGET_PID)
    URL=http://127.0.0.1:$port
    # Up to 30 s: under valgrind the program starts ~50x slower. (hyper-floor forwards /health
    # to the engine; either way an answer means it is up.)
    for ((i = 0; i < 150; i++)); do
        curl -fs -o /dev/null "$URL/health" 2>/dev/null && break
        kill -0 "$TARGET_PID" 2>/dev/null || die "$TARGET exited: $(cat "$WORK/target.log")"
        sleep 0.2
    done
    if [[ $TARGET == gateway ]]; then
        KEY=$(curl -fsS -X POST "$URL/admin/keys" -H "Authorization: Bearer $ADMIN" \
            -H 'Content-Type: application/json' -d "{\"name\":\"$NAME\"}" |
            sed -n 's/.*"key"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
        [[ -n $KEY ]] || die "could not create an API key (see $WORK/target.log)"
    fi
    export BENCH_KEY=$KEY BENCH_MODEL=$MODEL
}
