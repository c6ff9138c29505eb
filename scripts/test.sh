#!/usr/bin/env bash
# The project's test command: Rust tests of the whole workspace, then the OpenAI SDK
# compatibility tests (Python) against the real gateway binary.
#
# Works on a fresh Debian machine with only the Rust toolchain: installs what is missing
# (redis-server and redis-cli, python3-venv, a C compiler) with apt-get, as root or through
# sudo.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$(pwd)"

STEP="setup"
STARTED_AT=$SECONDS
STEP_STARTED_AT=$SECONDS

step_done() {
    if [[ "$STEP" != "setup" ]]; then
        printf -- '--- %s: ok (%ss)\n' "$STEP" "$((SECONDS - STEP_STARTED_AT))"
    fi
}

section() {
    step_done
    STEP="$1"
    STEP_STARTED_AT=$SECONDS
    printf '\n==> %s\n' "$STEP"
}

trap 'status=$?; printf "\nFAILED (exit %s) during: %s\n" "$status" "$STEP" >&2' ERR

# Root runs apt-get directly; anyone else goes through sudo when there is one.
as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root to run: $* (run as root or install sudo)" >&2
        return 1
    fi
}

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "missing: $* -- no apt-get here; install it with your package manager" >&2
        return 1
    fi
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# ---------------------------------------------------------------------------------------------
section "Rust target wasm32-wasip2"
if command -v rustup >/dev/null 2>&1; then
    # Run in the repository so that rust-toolchain.toml picks the toolchain it applies to.
    rustup target add wasm32-wasip2
else
    echo "rustup not found: skipping (the plugins will need the wasm32-wasip2 target)"
fi

# ---------------------------------------------------------------------------------------------
section "System packages"
needed=()
if ! command -v cc >/dev/null 2>&1; then
    needed+=(build-essential)
fi
installing_redis=0
if ! command -v redis-server >/dev/null 2>&1; then
    needed+=(redis-server)
    installing_redis=1
fi
# The Redis Cluster tests join their nodes with redis-cli (Debian's redis-tools, which
# redis-server depends on; checked apart for a redis-server installed some other way). The
# Sentinel tests run `redis-server --sentinel`: no redis-sentinel package is needed.
if ! command -v redis-cli >/dev/null 2>&1; then
    needed+=(redis-tools)
fi
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    needed+=(python3 python3-venv)
fi
# The cluster test runs deploy/nginx/nginx.conf in front of three replicas.
installing_nginx=0
if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
    needed+=(nginx-light)
    installing_nginx=1
fi
# The console's browser tests drive Debian's chromium headless through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    needed+=(chromium chromium-driver)
fi
# The deployment checks (scripts/check-deploy.sh) validate the compose stack with Debian's
# docker-compose and its Prometheus rules with promtool; the stack's process-level twin runs
# Debian's prometheus with the stack's own scrape config.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    needed+=(prometheus)
fi
if ! command -v docker-compose >/dev/null 2>&1; then
    needed+=(docker-compose)
fi
# The stack's Alertmanager config is checked with amtool, and the twin receives its alerts.
installing_alertmanager=0
if ! command -v amtool >/dev/null 2>&1 || ! command -v prometheus-alertmanager >/dev/null 2>&1; then
    needed+=(prometheus-alertmanager)
    installing_alertmanager=1
fi
# The JavaScript example plugin is built with componentize-js, from npm.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    needed+=(nodejs npm)
fi
if [[ ${#needed[@]} -gt 0 ]]; then
    echo "installing: ${needed[*]}"
    apt_install "${needed[@]}"
    if [[ "$installing_nginx" -eq 1 ]]; then
        # The test starts its own nginx on a free port; the packaged one is not needed.
        as_root service nginx stop >/dev/null 2>&1 || true
    fi
    if [[ "$installing_alertmanager" -eq 1 ]]; then
        # The twin test starts its own on a free port.
        as_root service prometheus-alertmanager stop >/dev/null 2>&1 || true
    fi
    if [[ "$installing_redis" -eq 1 ]]; then
        # The Rust tests start their own redis-server on a free port; the packaged service is
        # not needed, so stop the one the package may have started (best effort).
        if [[ -d /run/systemd/system ]]; then
            as_root systemctl stop redis-server >/dev/null 2>&1 || true
        else
            as_root service redis-server stop >/dev/null 2>&1 || true
        fi
    fi
else
    echo "all present: cc, redis-server, redis-cli, nginx, python3 with venv, chromium, prometheus, docker-compose, alertmanager"
fi
echo "redis-server: $(redis-server --version | head -n1)"
echo "redis-cli: $(redis-cli --version | head -n1)"
# The Redis Cluster tests give each node its bus port (`cluster-port`, Redis 7.0 and later).
redis_major="$(redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')"
if [[ -n "$redis_major" && "$redis_major" -lt 7 ]]; then
    echo "redis-server $redis_major.x is too old: the Redis Cluster tests need 7.0 or later" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------------
section "Python environment (.venv)"
VENV="$REPO_ROOT/.venv"
REQUIREMENTS="$REPO_ROOT/tests/python/requirements.txt"
CONSTRAINTS="$REPO_ROOT/tests/python/constraints.txt"
if [[ ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
# Reinstall only when requirements.txt, constraints.txt (or the interpreter) changed since the
# last install.
stamp="$VENV/.requirements.sha256"
want="$( { sha256sum "$REQUIREMENTS" "$CONSTRAINTS"; "$VENV/bin/python" --version; } | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS" -c "$CONSTRAINTS"
    echo "$want" >"$stamp"
    echo "installed tests/python/requirements.txt"
else
    echo "requirements already installed"
fi

# ---------------------------------------------------------------------------------------------
# The Python and JavaScript example plugins, built into components (the gateway's plugin tests
# load them), then checked in wasmtime with their own unit tests.
section "Polyglot plugins: scripts/build-plugins-polyglot.sh --check"
scripts/build-plugins-polyglot.sh --check

# ---------------------------------------------------------------------------------------------
# What is shipped beside the binaries: the images' Dockerfiles, the compose stack, its
# dashboards and alert rules (promtool), and the dependency policy (cargo deny).
section "Deployment files: scripts/check-deploy.sh"
scripts/check-deploy.sh

# ---------------------------------------------------------------------------------------------
section "cargo build --workspace --bins"
cargo build --workspace --bins

# ---------------------------------------------------------------------------------------------
# Tests named `*_alone` must not share the machine with other tests (.config/nextest.toml says
# so to nextest). `cargo test` runs one test binary at a time but a binary's tests in parallel,
# so without nextest they are skipped in the main run and run afterwards, one at a time.
# GARAGE_TEST_RUNNER=cargo takes that path even where nextest is installed.
if [[ "${GARAGE_TEST_RUNNER:-}" != "cargo" ]] && cargo nextest --version >/dev/null 2>&1; then
    section "Rust tests: cargo nextest run --workspace --no-fail-fast"
    cargo nextest run --workspace --no-fail-fast
    # nextest does not run doctests.
    section "Rust doctests: cargo test --workspace --doc"
    cargo test --workspace --doc
else
    section "Rust tests: cargo test --workspace --no-fail-fast (without nextest)"
    cargo test --workspace --no-fail-fast -- --skip _alone
    section "Rust tests that run alone: cargo test --workspace -- _alone --test-threads=1"
    cargo test --workspace --no-fail-fast --tests -- _alone --test-threads=1
fi

# ---------------------------------------------------------------------------------------------
# The default plugins' own workspace (they build for wasm32-wasip2; their tests run natively
# against the SDK's in-memory host).
section "Default plugins: cargo test in plugins/guests"
(cd plugins/guests && cargo test --locked)

# ---------------------------------------------------------------------------------------------
section "OpenAI SDK compatibility and the console in chromium: pytest tests/python"
GARAGE_GATEWAY_BIN=target/debug/gateway "$VENV/bin/python" -m pytest tests/python -q

step_done
printf '\nAll tests passed in %ss.\n' "$((SECONDS - STARTED_AT))"
