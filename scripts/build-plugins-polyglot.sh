#!/usr/bin/env bash
# Builds the example plugins written in Python and JavaScript into WebAssembly components:
#
#   target/polyglot-plugins/reward-python.wasm   plugins/python/reward (componentize-py)
#   target/polyglot-plugins/reward-js.wasm       plugins/js/reward     (componentize-js)
#
# Both are the `reward` world of garage:policy@0.5.0 (wit/v0.5), written on the author
# libraries of plugin-sdk/: plugin-sdk/python (garage_policy, on componentize-py's search path)
# and plugin-sdk/js (@garage/policy, bundled into the JavaScript by rolldown, see build.mjs).
#
# Usage: scripts/build-plugins-polyglot.sh [--check] [--force]
#   --check   then load both components in wasmtime and call them (plugins/python/check_component.py),
#             and run the native tests of the libraries and the policies (pytest, node --test)
#   --force   rebuild even when the inputs did not change
#
# Needs python3 (with venv), node >= 18 and npm; fetches the pinned tools from PyPI and npm:
# componentize-py and pytest into .venv-plugins/, componentize-js and rolldown into
# plugins/js/reward/node_modules/ (where npm ci also links @garage/policy).
# Idempotent and quick when nothing changed: each step keeps a stamp (a hash of its inputs) and
# is skipped while the stamp matches.
#
# Both components are "pure": they import only garage:policy/* and no WASI at all
# (componentize-py --stub-wasi, componentize-js with every optional feature disabled).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CHECK=0
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --check) CHECK=1 ;;
        --force) FORCE=1 ;;
        -h | --help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

OUT=target/polyglot-plugins
VENV=.venv-plugins
PY_DIR=plugins/python/reward
PY_SDK=plugin-sdk/python
JS_DIR=plugins/js/reward
JS_SDK=plugin-sdk/js
mkdir -p "$OUT"

# One build at a time (tests running in parallel may all call this script): the others wait,
# then find everything up to date.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUT/.lock"
    flock 9
fi

# A hash of files, order-independent of the filesystem; arguments are find(1) arguments.
hash_files() {
    find "$@" -type f ! -path '*/node_modules/*' ! -path '*/__pycache__/*' \
        ! -name 'test_*' ! -name '*.test.*' -print0 |
        LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

stamp_matches() { [[ "$FORCE" -eq 0 && -f "$1" && "$(cat "$1")" == "$2" ]]; }

now_ms() { date +%s%3N; }
seconds_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

# --- tools -----------------------------------------------------------------------------------
command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 1; }
command -v node >/dev/null && command -v npm >/dev/null || { echo "node and npm are needed" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    echo "creating $VENV"
    python3 -m venv "$VENV"
fi
# Keep the venv out of git without touching the repository's .gitignore.
[[ -f "$VENV/.gitignore" ]] || printf '*\n' >"$VENV/.gitignore"

want="$( { sha256sum "$PY_DIR/requirements.txt"; "$VENV/bin/python" --version; } | sha256sum | cut -d' ' -f1)"
if ! stamp_matches "$VENV/.requirements.sha256" "$want"; then
    started=$(now_ms)
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$PY_DIR/requirements.txt"
    echo "$want" >"$VENV/.requirements.sha256"
    echo "installed $PY_DIR/requirements.txt in $(seconds_since "$started") s"
fi

# `npm ci`: exactly the versions, tarballs and integrity hashes of the lockfile, which it never
# rewrites. It refuses a lockfile that misses a package a locked version declares, even an
# optional one for another platform; a lockfile written on a warm npm cache can miss those
# (npm/cli#9846), so the lockfile is checked to be complete first, with a message that says how
# to regenerate it. A locked version's declarations never change, so what the registry
# publishes later cannot break a complete lockfile.
node scripts/check-npm-lockfile.mjs "$JS_DIR/package-lock.json"
want="$( { sha256sum "$JS_DIR/package.json" "$JS_DIR/package-lock.json"; node --version; } |
    sha256sum | cut -d' ' -f1)"
if ! stamp_matches "$JS_DIR/node_modules/.garage-lock.sha256" "$want"; then
    started=$(now_ms)
    (cd "$JS_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$JS_DIR/node_modules/.garage-lock.sha256"
    echo "npm ci in $JS_DIR in $(seconds_since "$started") s"
fi

# --- builds ----------------------------------------------------------------------------------
# build NAME STAMP_INPUTS COMMAND...: runs COMMAND (which writes $OUT/NAME.wasm.tmp) unless the
# inputs' hash is the one the last successful build recorded.
build() {
    local name="$1" inputs="$2"
    shift 2
    local wasm="$OUT/$name.wasm" stamp="$OUT/$name.inputs.sha256"
    if [[ -f "$wasm" ]] && stamp_matches "$stamp" "$inputs"; then
        printf '%-20s up to date   %6s KiB\n' "$name.wasm" "$(( $(stat -c %s "$wasm") / 1024 ))"
        return
    fi
    local started
    started=$(now_ms)
    rm -f "$wasm.tmp" "$stamp"
    "$@" >"$OUT/$name.log" 2>&1 || {
        cat "$OUT/$name.log" >&2
        echo "build of $name.wasm failed" >&2
        return 1
    }
    mv "$wasm.tmp" "$wasm"
    echo "$inputs" >"$stamp"
    printf '%-20s built in %ss  %6s KiB\n' "$name.wasm" "$(seconds_since "$started")" \
        "$(( $(stat -c %s "$wasm") / 1024 ))"
}

componentize_version="$("$VENV/bin/componentize-py" --version)"
py_inputs="$( { hash_files "$PY_DIR" "$PY_SDK/garage_policy" wit; echo "$componentize_version"; } |
    sha256sum | cut -d' ' -f1)"
# VIRTUAL_ENV would make componentize-py bundle that venv's site-packages into the component.
build reward-python "$py_inputs" \
    env -u VIRTUAL_ENV "$VENV/bin/componentize-py" -d wit/v0.5 -w reward componentize app \
    -p "$PY_DIR" -p "$PY_SDK" --stub-wasi -o "$OUT/reward-python.wasm.tmp"

js_inputs="$( { hash_files "$JS_DIR" "$JS_SDK" wit; node --version; } | sha256sum | cut -d' ' -f1)"
build reward-js "$js_inputs" node "$JS_DIR/build.mjs" "$OUT/reward-js.wasm.tmp"

# --- checks ----------------------------------------------------------------------------------
if [[ "$CHECK" -eq 1 ]]; then
    echo "native tests of the libraries and the policies"
    # -p no:cacheprovider: no .pytest_cache folders in the tree.
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$PY_SDK"
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$PY_DIR"
    node --test --test-reporter=spec "$JS_SDK"/test/*.test.mjs "$JS_DIR"/*.test.mjs
    echo "components in wasmtime"
    "$VENV/bin/python" plugins/python/check_component.py "$OUT/reward-python.wasm" "$OUT/reward-js.wasm"
fi
