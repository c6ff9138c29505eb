#!/usr/bin/env bash
# Three gateway replicas on one Redis, acting as one gateway, with RIGS simulated rigs spread
# over them (`node-runner swarm`, zero-latency engines, the default plugins on). Measures:
#   1. req/s and p50/p99 of plain chat completions, c=16, all through one replica against the
#      same 16 connections spread over the three;
#   2. what forwarding costs: one rig serving a model of its own, tunnelled to replica B only;
#      c=1 on B (local) against c=1 on A (A forwards to B over HTTP/2), latency and CPU per
#      request of each replica;
#   3. how long a key revocation and a plugin swap made on A take to reach B and C;
#   4. how long the rigs of a replica killed with SIGKILL take to be routable again elsewhere.
# See bench/README.md ("Several replicas").
#
# Usage: bench/cluster.sh                      (300 rigs, about 5 minutes after the build)
#        BENCH_RIGS=30 BENCH_DURATION=3 BENCH_ROUNDS=1 bench/cluster.sh   (quick look)
#
# Environment:
#   BENCH_RIGS         simulated rigs spread over the replicas (default 300)
#   BENCH_DURATION     measured seconds per load run (default 10)
#   BENCH_WARMUP       unmeasured seconds before each load run (default 2; 0: none)
#   BENCH_ROUNDS       rounds of each pair of load runs, the two alternating; the median round
#                      by req/s is reported, every round listed under the table (default 3)
#   BENCH_REPEATS      repetitions of each propagation measurement (default 5)
#   BENCH_SKIP_BUILD   1: use the release binaries already built
#   BENCH_GATEWAY_LOG  the replicas' and rigs' RUST_LOG (default warn)
#
# Progress goes to stderr; the markdown report to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

RIGS=${BENCH_RIGS:-300}
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
ROUNDS=${BENCH_ROUNDS:-3}
REPEATS=${BENCH_REPEATS:-5}
SKIP_BUILD=${BENCH_SKIP_BUILD:-0}
LOG_LEVEL=${BENCH_GATEWAY_LOG:-warn}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=$TARGET_DIR/release
ADMIN=bench-admin
# The replicas authenticate each other with this; the gateway wants at least 32 characters.
CLUSTER_SECRET=bench-cluster-secret-0123456789abcdef
MODEL=sim-model
FWD_MODEL=fwd-model
# Plain chat through one replica against the same connections over three (6 + 5 + 5).
CONNS=16

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for v in RIGS DURATION ROUNDS REPEATS; do
    is_uint "${!v}" && ((${!v} > 0)) || die "BENCH_$v must be a positive integer"
done
is_uint "$WARMUP" || die "BENCH_WARMUP must be a non-negative integer"

# --- tools and binaries ------------------------------------------------------------------------

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v redis-server >/dev/null || missing+=(redis-server)
if ((${#missing[@]} > 0)); then
    log "installing ${missing[*]} with apt-get"
    command -v apt-get >/dev/null || die "${missing[*]} missing and there is no apt-get"
    SUDO=()
    (($(id -u) == 0)) || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${missing[@]}" >&2
fi
command -v python3 >/dev/null || die "python3 is required"
if [[ $SKIP_BUILD != 1 ]]; then
    log "building the release binaries (may wait for the cargo lock)"
    # The gateway embeds its default plugins, built for wasm32-wasip2.
    if command -v rustup >/dev/null 2>&1; then
        rustup target add wasm32-wasip2 >/dev/null 2>&1 || log "warning: could not add the wasm32-wasip2 target"
    fi
    cargo build --release -q -p garage-gateway-bin -p garage-node-runner >&2
fi
[[ -x $BIN/gateway && -x $BIN/node-runner ]] || die "no release binaries in $BIN"
# The plugin swapped in step 3: the round-robin router the build made beside the defaults.
SWAP_WASM=$TARGET_DIR/wasm-plugins/wasm32-wasip2/release/router_round_robin.wasm
[[ -f $SWAP_WASM ]] || SWAP_WASM=$(find "$BIN/build" -name router_round_robin.wasm -print -quit 2>/dev/null || true)
[[ -f $SWAP_WASM ]] || die "router_round_robin.wasm not found (built with the gateway)"

# --- processes and cleanup ---------------------------------------------------------------------

work=$(mktemp -d "${TMPDIR:-/tmp}/garage-cluster.XXXXXX")
REDIS_PID="" FWD_SWARM_PID="" SWARM_PID=""
REPLICA_PIDS=("" "" "")
stop() { # pid: SIGTERM, up to 5 s, then SIGKILL
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop "$SWARM_PID"; stop "$FWD_SWARM_PID"
    for pid in "${REPLICA_PIDS[@]}"; do stop "$pid"; done
    stop "$REDIS_PID"
    if ((status != 0)); then
        for f in "$work"/*.log; do
            [[ -s $f ]] || continue
            log "--- last lines of $(basename "$f") ---"
            tail -n 15 "$f" >&2
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # what seconds command...: polls every 0.2 s, bounded
    local what=$1 limit=$2 until=$((SECONDS + $2))
    shift 2
    until "$@"; do
        ((SECONDS < until)) || die "$what: not after $limit s"
        sleep 0.2
    done
}
admin() { curl -sf -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' "$@"; }
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

# The helper that times what curl in a loop would blur (each poll a few ms): keep-alive
# connections, a monotonic clock; and the arithmetic of the report.
cat >"$work/cluster.py" <<'PY'
import http.client, json, os, signal, statistics, sys, time, urllib.parse

class Conn:
    """One keep-alive connection to a replica, reopened when it breaks."""
    def __init__(self, base):
        u = urllib.parse.urlsplit(base)
        self.host, self.port, self.c = u.hostname, u.port, None
    def req(self, method, path, token=None, body=None, ctype="application/json"):
        headers = {"Authorization": "Bearer " + token} if token else {}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        if body is not None:
            headers["Content-Type"] = ctype
        for attempt in (0, 1):
            try:
                if self.c is None:
                    self.c = http.client.HTTPConnection(self.host, self.port, timeout=10)
                self.c.request(method, path, body=body, headers=headers)
                r = self.c.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, OSError):
                if self.c:
                    self.c.close()
                self.c = None
                if attempt:
                    return 0, b""
    def json(self, method, path, token, body=None, ctype="application/json"):
        status, data = self.req(method, path, token, body, ctype)
        if not 200 <= status < 300:
            sys.exit(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)

ADMIN = os.environ["ADMIN"]
ASK = {"model": os.environ.get("MODEL", "sim-model"), "max_tokens": 1,
       "messages": [{"role": "user", "content": "hi"}]}

def ms(t):
    return round(t * 1000, 1)

def summary(values):
    return f"{statistics.median(values):.1f}\t{min(values):.1f}\t{max(values):.1f}\t{len(values)}"

def until_all(pending, check, bound):
    """Polls each replica in `pending` until `check(conn)` holds; returns seconds per replica
    from the caller's t0 (None for one that never did within `bound` s)."""
    t0 = time.perf_counter()
    done = {}
    while pending and time.perf_counter() - t0 < bound:
        for name, conn in list(pending.items()):
            if check(conn):
                done[name] = time.perf_counter()
                del pending[name]
    return done

def revocation(a, others, reps):
    """Key made on A, used on the others (cached there), revoked on A: ms until each refuses."""
    a, others = Conn(a), {n: Conn(b) for n, b in others.items()}
    times, acks = [], []
    for i in range(reps):
        key = a.json("POST", "/admin/keys", ADMIN, {"name": f"revoke-{i}"})
        for name, conn in others.items():
            deadline = time.time() + 10
            while conn.req("POST", "/v1/chat/completions", key["key"], ASK)[0] != 200:
                if time.time() > deadline:
                    sys.exit(f"the new key is not accepted on {name}")
                time.sleep(0.05)
        t0 = time.perf_counter()
        a.json("DELETE", f"/admin/keys/{key['id']}", ADMIN)
        acks.append(ms(time.perf_counter() - t0))
        done = until_all(dict(others), lambda c: c.req("POST", "/v1/chat/completions",
                                                      key["key"], ASK)[0] in (401, 403), 90)
        if len(done) < len(others):
            sys.exit(f"revocation not seen by {set(others) - set(done)} after 90 s")
        times.append(ms(max(done.values()) - t0))
    print(f"revoke\t{summary(times)}\t{summary(acks)}\t{' '.join(map(str, times))}")

def router_sha(conn):
    slots = conn.json("GET", "/admin/plugins", ADMIN)["data"]
    router = next(s for s in slots if s["slot"] == "router")
    return (router["active"] or {}).get("sha256")

def swaps(a, others, wasm, reps):
    """Upload and activate a router on A, then rollback/activate in turn: ms until the others
    show the new active version in their /admin/plugins."""
    a, others = Conn(a), {n: Conn(b) for n, b in others.items()}
    default = router_sha(a)
    def timed(method, path, body=None, ctype="application/json"):
        t0 = time.perf_counter()
        target = a.json(method, path, ADMIN, body, ctype)["sha256"]
        done = until_all(dict(others), lambda c: router_sha(c) == target, 60)
        if len(done) < len(others):
            sys.exit(f"plugin swap not seen by {set(others) - set(done)} after 60 s")
        return ms(max(done.values()) - t0), target
    upload, new = timed("PUT", "/admin/plugins/router", open(wasm, "rb").read(), "application/wasm")
    rollbacks, activations = [timed("POST", "/admin/plugins/router/rollback")[0]], []
    for _ in range(reps - 1):
        activations.append(timed("POST", "/admin/plugins/router/activate", {"sha256": new})[0])
        rollbacks.append(timed("POST", "/admin/plugins/router/rollback")[0])
    if router_sha(a) != default:
        sys.exit("the default router is not active again after the swaps")
    print(f"swap\t{upload}\t{summary(activations or [0])}\t{summary(rollbacks)}\t"
          f"{' '.join(map(str, activations)) or '–'}\t{' '.join(map(str, rollbacks))}")

def nodes(conn):
    return conn.json("GET", "/admin/nodes", ADMIN)["data"]

def failover(a, c, c_pid, expected):
    """SIGKILL replica C; seconds until A routes every rig and none through C."""
    a, c = Conn(a), Conn(c)
    victim = next((n["replica"] for n in nodes(c) if n["connected"]), None)
    if victim is None:
        sys.exit("no rig holds its tunnel on replica C")
    held = sum(1 for n in nodes(a) if n["replica"] == victim)
    t0 = time.perf_counter()
    os.kill(c_pid, signal.SIGKILL)
    first_gone = None
    while time.perf_counter() - t0 < 120:
        now = nodes(a)
        routable = [n for n in now if n["routable"]]
        on_victim = sum(1 for n in now if n["replica"] == victim)
        if first_gone is None and on_victim < held:
            first_gone = time.perf_counter() - t0
        if len(routable) >= expected and on_victim == 0:
            print(f"failover\t{held}\t{time.perf_counter() - t0:.2f}\t{first_gone or 0:.2f}")
            return
        # Each listing reads every rig's live record from Redis: leave the cores to the rigs
        # reconnecting.
        time.sleep(0.05)
    sys.exit(f"after 120 s: {len(routable)} of {expected} routable, {on_victim} on the killed replica")

def wrk_result(path):
    """requests, errors and (value µs, weight) points from one wrk run's output."""
    fields, points = {}, []
    for line in open(path):
        if line.startswith("BENCH_RESULT "):
            fields = dict(kv.split("=") for kv in line.split()[1:])
        elif line.startswith("BENCH_QUANTILES "):
            points = [float(v) for v in line.split()[1:]]
    if not fields:
        sys.exit(f"no BENCH_RESULT in {path}: {open(path).read()[-500:]}")
    n = int(fields["requests"])
    errors = sum(int(v) for k, v in fields.items() if k.startswith("err_"))
    return n, float(fields["duration_us"]), errors, [(p, n / len(points)) for p in points]

def quantile(points, q):
    points = sorted(points)
    total, seen = sum(w for _, w in points), 0.0
    for value, weight in points:
        seen += weight
        if seen >= q * total:
            return value
    return points[-1][0]

def row(label, before, after, *outputs):
    """One load run: wrk outputs merged (requests summed, latency quantiles over all of them),
    CPU per request of each process from two snapshots."""
    b = dict(kv.split("=") for kv in before.split())
    e = dict(kv.split("=") for kv in after.split())
    runs = [wrk_result(p) for p in outputs]
    n = sum(r[0] for r in runs)
    rps = sum(r[0] / (r[1] / 1e6) for r in runs)
    points = [p for r in runs for p in r[3]]
    tck = int(b["clk"])
    def cpu(name):
        return (int(e[name]) - int(b[name])) / tck * 1e6 / max(n, 1)
    ours = sum(int(e[k]) - int(b[k]) for k in ("A", "B", "C", "redis", "rigs", "self"))
    busy, total = int(e["busy"]) - int(b["busy"]), int(e["total"]) - int(b["total"])
    other = max(0.0, 100 * (busy - ours) / total) if total else 0.0
    print("\t".join([label, f"{rps:.0f}", f"{quantile(points, .5) / 1000:.3f}",
                     f"{quantile(points, .99) / 1000:.3f}"]
                    + [f"{cpu(k):.1f}" for k in ("A", "B", "C", "redis", "rigs", "self")]
                    + [f"{other:.0f}", str(sum(r[2] for r in runs)), str(n)]))

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "revoke":
        revocation(args[0], {"B": args[1], "C": args[2]}, int(args[3]))
    elif cmd == "swap":
        swaps(args[0], {"B": args[1], "C": args[2]}, args[3], int(args[4]))
    elif cmd == "failover":
        failover(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "row":
        row(*args)
PY
# bench/lib.lua's request, and the latency distribution at every 0.1 % so that the runs of
# three wrk processes can be merged into one p50/p99.
cat >"$work/cluster.lua" <<LUA
bench_stream = false
dofile("$PWD/bench/lib.lua")
local report = done
done = function(summary, latency, requests)
  report(summary, latency, requests)
  local points = {}
  for i = 1, 999 do points[i] = latency:percentile(i / 10) end
  io.write("BENCH_QUANTILES " .. table.concat(points, " ") .. "\n")
end
LUA
helper() { ADMIN=$ADMIN MODEL=$MODEL python3 "$work/cluster.py" "$@"; }

# --- Redis and three replicas ------------------------------------------------------------------

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    >"$work/redis.log" 2>&1 &
REDIS_PID=$!
redis_up() { redis-cli -p "$redis_port" ping >/dev/null 2>&1; }
wait_for "redis-server" 10 redis_up
BASES=()
for n in 0 1 2; do
    port=$(free_port)
    BASES+=("http://127.0.0.1:$port")
    RUST_LOG=$LOG_LEVEL \
        GARAGE_LISTEN=127.0.0.1:$port \
        GARAGE_STORE=redis://127.0.0.1:$redis_port/0 \
        GARAGE_AUTH_ADMIN_TOKEN=$ADMIN \
        GARAGE_AUTH_KEY_SECRET=bench-shared-key-secret \
        GARAGE_CLUSTER_ADVERTISE_URL=http://127.0.0.1:$port \
        GARAGE_CLUSTER_SECRET=$CLUSTER_SECRET \
        "$BIN/gateway" serve >"$work/replica-$n.log" 2>&1 &
    REPLICA_PIDS[n]=$!
done
for base in "${BASES[@]}"; do wait_for "replica $base" 60 curl -sf "$base/health" -o /dev/null; done
A=${BASES[0]} B=${BASES[1]} C=${BASES[2]}
KEY=$(admin -d '{"name":"bench"}' "$A/admin/keys" | json_field key)

# Rigs routable as replica `base` sees them.
routable_at_least() { # base count
    local n
    n=$(curl -sf -H "Authorization: Bearer $ADMIN" "$1/admin/nodes" |
        python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin)["data"] if n["routable"]))') || return 1
    ((n >= $2))
}
start_swarm() { # log gateways count model -> pid in SWARM_STARTED
    local token
    token=$(admin -d "{\"operator\":\"bench\",\"max_uses\":$3}" "$A/admin/enrollment-tokens" | json_field token)
    RUST_LOG=$LOG_LEVEL "$BIN/node-runner" swarm --gateway "$2" --token "$token" --count "$3" \
        --model "$4" --tokens-per-sec 0 >"$work/$1.log" 2>&1 &
    SWARM_STARTED=$!
}

# --- measuring load ----------------------------------------------------------------------------

clk=$(getconf CLK_TCK)
ticks() { [[ -n $1 && -r /proc/$1/stat ]] && awk '{print $14+$15}' "/proc/$1/stat" || echo 0; }
# CPU ticks of each process of the cluster, of this script's reaped children (wrk, curl) and
# of the whole machine, as key=value words.
snapshot() {
    local rigs=$(($(ticks "$FWD_SWARM_PID") + $(ticks "$SWARM_PID")))
    printf 'A=%s B=%s C=%s redis=%s rigs=%s self=%s clk=%s ' "$(ticks "${REPLICA_PIDS[0]}")" \
        "$(ticks "${REPLICA_PIDS[1]}")" "$(ticks "${REPLICA_PIDS[2]}")" "$(ticks "$REDIS_PID")" \
        "$rigs" "$(awk '{print $16+$17}' /proc/$$/stat)" "$clk"
    awk '/^cpu / {print "busy=" $2+$3+$4+$7+$8+$9, "total=" $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat
}
ROWS=()
# measure LABEL MODEL CONNS_A CONNS_B CONNS_C: a warm-up, then the measured run, one wrk per
# replica with connections, all at once.
measure() {
    local label=$1 model=$2 conns=("$3" "$4" "$5") i pids=() outs=() before after
    for pass in warmup measured; do
        local seconds=$DURATION
        [[ $pass == warmup ]] && seconds=$WARMUP
        ((seconds > 0)) || continue
        [[ $pass == measured ]] && before=$(snapshot)
        pids=() outs=()
        for i in 0 1 2; do
            ((conns[i] > 0)) || continue
            BENCH_KEY=$KEY BENCH_MODEL=$model wrk -t1 -c"${conns[i]}" -d"${seconds}s" \
                -s "$work/cluster.lua" "${BASES[i]}" >"$work/wrk-$i.out" 2>&1 &
            pids+=($!) outs+=("$work/wrk-$i.out")
        done
        wait "${pids[@]}"
    done
    after=$(snapshot)
    ROWS+=("$(helper row "$label" "$before" "$after" "${outs[@]}")")
    log "  ${ROWS[-1]}"
}

# --- 2. a forwarded request against a local one (before the swarm joins) -------------------------

log "one rig serving $FWD_MODEL, tunnelled to replica B only"
start_swarm fwd-rig "$B" 1 "$FWD_MODEL"
FWD_SWARM_PID=$SWARM_STARTED
for base in "${BASES[@]}"; do wait_for "the $FWD_MODEL rig routable on $base" 60 routable_at_least "$base" 1; done
log "c=1 on B (local) and on A (forwarded to B), $ROUNDS round(s) of ${DURATION} s"
for ((round = 1; round <= ROUNDS; round++)); do
    measure "local" "$FWD_MODEL" 0 1 0
    measure "forwarded" "$FWD_MODEL" 1 0 0
done

# --- 1. one replica against three ----------------------------------------------------------------

log "$RIGS rigs joining, spread over the three replicas"
started=$(date +%s.%N)
start_swarm rigs "$(IFS=,; echo "${BASES[*]}")" "$RIGS" "$MODEL"
SWARM_PID=$SWARM_STARTED
for base in "${BASES[@]}"; do
    wait_for "$RIGS rigs routable on $base" 300 routable_at_least "$base" $((RIGS + 1))
done
JOINED=$(python3 -c "import time; print(round(time.time() - $started, 1))")
log "joined in $JOINED s; c=$CONNS through A, and $((CONNS / 3 + CONNS % 3))+$((CONNS / 3))+$((CONNS / 3)) over A, B, C"
for ((round = 1; round <= ROUNDS; round++)); do
    measure "one" "$MODEL" "$CONNS" 0 0
    measure "three" "$MODEL" $((CONNS / 3 + CONNS % 3)) $((CONNS / 3)) $((CONNS / 3))
done
# Idle: heartbeats and tunnel pings only.
IDLE_BEFORE=$(snapshot); sleep 10; IDLE_AFTER=$(snapshot)

# --- 3. propagation ------------------------------------------------------------------------------

log "key revocations ($REPEATS) and plugin swaps (an upload, then $((REPEATS - 1)) activations and $REPEATS rollbacks)"
REVOKE=$(helper revoke "$A" "$B" "$C" "$REPEATS")
SWAP=$(helper swap "$A" "$B" "$C" "$SWAP_WASM" "$REPEATS")

# --- 4. a replica dies ---------------------------------------------------------------------------

log "SIGKILL replica C"
# Reaped without bash's "Killed" notice.
disown "${REPLICA_PIDS[2]}"
FAILOVER=$(helper failover "$A" "$C" "${REPLICA_PIDS[2]}" $((RIGS + 1)))
REPLICA_PIDS[2]=""

# --- report --------------------------------------------------------------------------------------

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
SOURCES=(gateway node-runner node-protocol plugins Cargo.toml Cargo.lock)
DIRTY=$(git status --porcelain -- "${SOURCES[@]}" 2>/dev/null | wc -l)
((DIRTY == 0)) || COMMIT="$COMMIT + uncommitted changes in $DIRTY file(s) of ${SOURCES[*]}"
# The median round of a mode by req/s (the lower middle for an even count).
median_row() {
    printf '%s\n' "${ROWS[@]}" | awk -F'\t' -v m="$1" '$1 == m' | sort -t$'\t' -k2,2g |
        awk -v k=$(((ROUNDS + 1) / 2)) 'NR == k'
}
echo "## Three replicas, one gateway"
echo
echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $COMMIT; release profile"
if [[ $SKIP_BUILD == 1 ]]; then
    echo "- Binaries not rebuilt (BENCH_SKIP_BUILD=1): gateway built $(date -u -r "$BIN/gateway" '+%Y-%m-%d %H:%M UTC'), which may predate the tree above"
fi
echo "- Machine: $(nproc) CPU(s), $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1); everything (Redis, 3 replicas, rigs, wrk) on it"
echo "- Load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- $RIGS rigs (\`node-runner swarm --tokens-per-sec 0\`) joined all three replicas in $JOINED s; default plugins; RUST_LOG=$LOG_LEVEL; ${DURATION} s measured after ${WARMUP} s warm-up per run, median of $ROUNDS round(s)"
echo
echo "| run | req/s | p50 ms | p99 ms | A µs/req | B µs/req | C µs/req | redis µs/req | rigs µs/req | wrk µs/req | other CPU % | errors |"
echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
declare -A KEPT
for mode in one three local forwarded; do
    KEPT[$mode]=$(median_row "$mode")
    IFS=$'\t' read -r _ rps p50 p99 a b c redis rigs self other errors _ <<<"${KEPT[$mode]}"
    case $mode in
        one) what="plain chat, c=$CONNS, all through A" ;;
        three) what="plain chat, c=$CONNS spread over A, B, C" ;;
        local) what="$FWD_MODEL c=1 on B (rig tunnelled to B: local)" ;;
        forwarded) what="$FWD_MODEL c=1 on A (forwarded to B)" ;;
    esac
    echo "| $what | $rps | $p50 | $p99 | $a | $b | $c | $redis | $rigs | $self | $other | $errors |"
done
IFS=$'\t' read -r _ _ l50 l99 la lb _ lr _ <<<"${KEPT[local]}"
IFS=$'\t' read -r _ _ f50 f99 fa fb _ fr _ <<<"${KEPT[forwarded]}"
awk -v l50="$l50" -v l99="$l99" -v f50="$f50" -v f99="$f99" -v la="$la" -v lb="$lb" -v fa="$fa" \
    -v fb="$fb" -v lr="$lr" -v fr="$fr" 'BEGIN {
    printf "| forwarded − local | | %+.3f | %+.3f | %+.1f | %+.1f | | %+.1f | | | | |\n", f50 - l50, f99 - l99, fa - la, fb - lb, fr - lr
    printf "\nForwarding added %+.3f ms at p50 (target < 0.3 ms: %s) and %+.3f ms at p99. CPU per request of the two replicas together: %.1f µs local (all on B), %.1f µs forwarded (A %.1f + B %.1f), %+.1f µs; redis %.1f → %.1f µs.\n",
        f50 - l50, (f50 - l50 < 0.3 ? "met" : "missed"), f99 - l99, la + lb, fa + fb, fa, fb, fa + fb - la - lb, lr, fr }'
echo
IFS=$'\t' read -r _ rmed rmin rmax rn amed amin amax _ rall <<<"$REVOKE"
IFS=$'\t' read -r _ upload smed smin smax sn bmed bmin bmax bn sall ball <<<"$SWAP"
IFS=$'\t' read -r _ held failover first <<<"$FAILOVER"
idle=$(python3 -c "
b = dict(kv.split('=') for kv in '$IDLE_BEFORE'.split()); e = dict(kv.split('=') for kv in '$IDLE_AFTER'.split())
d = lambda k: (int(e[k]) - int(b[k])) / int(b['clk']) / 10 * 100
print(f\"{d('A'):.1f} / {d('B'):.1f} / {d('C'):.1f} % (A / B / C), redis {d('redis'):.1f} %, rigs {d('rigs'):.1f} %\")")
echo "| propagation | median | min–max | n |"
echo "|---|--:|--:|--:|"
echo "| key revoked on A → refused on B and C, ms | $rmed | $rmin–$rmax | $rn |"
echo "| plugin upload on A (router, new component) → active on B and C, ms | $upload | | 1 |"
echo "| plugin activate on A (that stored version again) → active on B and C, ms | $smed | $smin–$smax | $sn |"
echo "| plugin rollback on A (to the default router) → active on B and C, ms | $bmed | $bmin–$bmax | $bn |"
echo "| SIGKILL of C → all $((RIGS + 1)) rigs routable on A, none on C ($held were), s | $failover | | 1 |"
echo
echo "Revocation rounds, ms: $rall (A answered the DELETE in $amed ms, median). Activations, ms: $sall; rollbacks: $ball."
echo "The first of C's rigs was back elsewhere after $first s. Idle CPU with $RIGS rigs (heartbeats, tunnel pings): $idle."
echo
echo "CPU columns: user+system time from /proc over the measured run per completed request;" \
    "wrk's is this script's reaped children. \"other CPU %\": the share of all $(nproc) CPUs used" \
    "by anything else during the run. Every round (run: req/s, p50, p99 ms):"
echo
printf '%s\n' "${ROWS[@]}" | awk -F'\t' '{ printf "- %s: %s req/s, %s / %s ms, A %s B %s C %s µs/req, other %s %%\n", $1, $2, $3, $4, $5, $6, $7, $11 }'
