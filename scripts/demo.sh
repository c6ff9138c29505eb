#!/usr/bin/env bash
# The one-command demo: the gateway with simulated rigs and a ready API key.
# Arguments go to `gateway demo` (try --help): scripts/demo.sh --nodes 5 --listen 0.0.0.0:8080
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if command -v rustup >/dev/null 2>&1; then
    rustup target add wasm32-wasip2 >/dev/null 2>&1 || echo "warning: could not add the wasm32-wasip2 target" >&2
fi
# The gateway, and the `garage` command line its banner suggests for batch jobs.
cargo build --release -p garage-gateway-bin -p garage-cli --bins
exec "${CARGO_TARGET_DIR:-target}/release/gateway" demo "$@"
