#!/usr/bin/env bash
# Release artefacts, built from this checkout: the binaries a rig owner or an operator runs with
# no Rust toolchain, each with a CycloneDX SBOM and its debug info apart (<bin>.debug), and
# SHA256SUMS over all of them, in dist/.
#
#   scripts/release.sh                     # gateway, garage and node-runner
#   scripts/release.sh gateway             # some of them (the images build theirs this way)
#   scripts/release.sh --out DIR ...       # somewhere else than dist/
#   scripts/release.sh --print-build ...   # the cargo command of each, and nothing else
#
# gateway and garage are static x86_64 musl binaries: they run on any x86_64 Linux. node-runner
# is linked against glibc instead: it loads the NVIDIA driver's libnvidia-ml.so at run time
# (nvml-wrapper), and a static musl binary cannot load any shared library ("Dynamic loading not
# supported"). It needs the glibc of the machine that built it, or a newer one (BUILDINFO says
# which). docs/supply-chain.md explains the choices and how to check what this produces.
#
# The build: the `dist` profile (fat LTO, Cargo.toml), `--locked` (Cargo.lock as committed, so
# the SBOM describes what was compiled), in a target directory of its own so that a release
# build never holds the lock of target/ that day-to-day builds and tests wait on.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The SBOM tool, pinned: the images install the same version (deploy/docker/*.Dockerfile, checked
# by scripts/deploy/10-dockerfiles.sh).
CARGO_CYCLONEDX_VERSION=0.5.9
PROFILE=dist
TARGET_DIR="${RELEASE_TARGET_DIR:-target/release-artefacts}"

# binary:package:its folder:target, one line per artefact.
ARTEFACTS=(
    gateway:garage-gateway-bin:gateway/bin:x86_64-unknown-linux-musl
    garage:garage-cli:cli:x86_64-unknown-linux-musl
    node-runner:garage-node-runner:node-runner:x86_64-unknown-linux-gnu
)
# The default policies the gateway embeds (gateway/src/server.rs installs them; plugins/build.rs
# builds them for wasm32-wasip2): each must be found, byte for byte, inside the released gateway.
# The other components of garage-plugins (two more routers, the test fixtures) are not referenced
# by the gateway, and the linker leaves them out.
EMBEDDED_PLUGINS=(router_least_loaded rate_limiter meter reward)

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

OUT=dist
PRINT_ONLY=0
selected=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
        --print-build) PRINT_ONLY=1; shift ;;
        -h | --help) usage 0 ;;
        -*) echo "unknown option: $1" >&2; usage 2 >&2 ;;
        *) selected+=("$1"); shift ;;
    esac
done

# The artefacts asked for (all of them when none is named); an unknown name is an error.
chosen=()
if [[ ${#selected[@]} -eq 0 ]]; then
    chosen=("${ARTEFACTS[@]}")
else
    for name in "${selected[@]}"; do
        found=""
        for artefact in "${ARTEFACTS[@]}"; do
            [[ "${artefact%%:*}" == "$name" ]] && found="$artefact"
        done
        if [[ -z "$found" ]]; then
            echo "unknown artefact: $name (known: gateway garage node-runner)" >&2
            exit 2
        fi
        chosen+=("$found")
    done
fi

build_command() {
    local bin="$1" package="$2" target="$3"
    echo "cargo build --locked --profile $PROFILE --target $target --package $package --bin $bin"
}

if [[ "$PRINT_ONLY" -eq 1 ]]; then
    for artefact in "${chosen[@]}"; do
        IFS=: read -r bin package folder target <<<"$artefact"
        build_command "$bin" "$package" "$target"
    done
    exit 0
fi

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

echo "== toolchain"
targets=(wasm32-wasip2)
for artefact in "${chosen[@]}"; do
    IFS=: read -r _ _ _ target <<<"$artefact"
    targets+=("$target")
done
# Run here, so that rust-toolchain.toml picks the toolchain the targets are added to.
rustup target add $(printf '%s\n' "${targets[@]}" | sort -u)
# ring and mimalloc compile C for the musl target: Debian's musl-tools gives musl-gcc.
if printf '%s\n' "${targets[@]}" | grep -q musl && ! command -v musl-gcc >/dev/null 2>&1; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends musl-tools
fi
if [[ "$(cargo cyclonedx --version 2>/dev/null || true)" != "cargo-cyclonedx $CARGO_CYCLONEDX_VERSION" ]]; then
    cargo install --locked cargo-cyclonedx --version "$CARGO_CYCLONEDX_VERSION"
fi
rustc -vV

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export CARGO_TARGET_DIR="$TARGET_DIR"
buildinfo="$OUT/BUILDINFO"
{
    if commit="$(git rev-parse HEAD 2>/dev/null)"; then
        git diff --quiet HEAD -- || commit+=" with uncommitted changes"
        echo "commit: $commit"
    else
        echo "commit: unknown (no git here: an image build's context has no .git)"
    fi
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "rustc: $(rustc -V)"
    echo "cargo-cyclonedx: $CARGO_CYCLONEDX_VERSION"
    echo "profile: $PROFILE"
} >"$buildinfo"

for artefact in "${chosen[@]}"; do
    IFS=: read -r bin package folder target <<<"$artefact"
    command="$(build_command "$bin" "$package" "$target")"
    echo "== $bin: $command"
    started=$SECONDS
    $command
    built="$TARGET_DIR/$target/$PROFILE/$bin"
    install -m 0755 "$built" "$OUT/$bin"

    # Linking: musl artefacts must need nothing at run time; node-runner's needs are written down.
    if [[ "$target" == *musl ]]; then
        if readelf -d "$OUT/$bin" | grep -q NEEDED || readelf -lW "$OUT/$bin" | grep -q INTERP; then
            echo "$bin is not static: $(readelf -d "$OUT/$bin" | grep NEEDED)" >&2
            exit 1
        fi
        linking="static"
    else
        glibc="$(objdump -T "$OUT/$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)"
        linking="dynamic: $(readelf -d "$OUT/$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')(needs $glibc or newer)"
    fi
    # The line tables (the profile's debug = "line-tables-only", for panics' file:line) are three
    # quarters of the gateway's 200 MB: they go to <bin>.debug beside it, linked by
    # .gnu_debuglink for gdb and addr2line, and the binary (and so the image) keeps its symbols.
    objcopy --only-keep-debug "$OUT/$bin" "$OUT/$bin.debug"
    chmod 0644 "$OUT/$bin.debug"
    (cd "$OUT" && objcopy --strip-debug --add-gnu-debuglink="$bin.debug" "$bin")
    "$OUT/$bin" --version >/dev/null
    echo "$bin: $target, $linking; $command" >>"$buildinfo"

    # The SBOM: the crates compiled into this binary for this target, from Cargo.lock.
    # cargo-cyclonedx writes one file per binary of the workspace, beside each package's
    # Cargo.toml: this one's is moved into $OUT, the others it just wrote are removed.
    stamp="$(mktemp)"
    cargo cyclonedx --manifest-path "$folder/Cargo.toml" --format json --spec-version 1.5 \
        --target "$target" --describe binaries --quiet
    mv "$folder/${bin}_bin.cdx.json" "$OUT/$bin.cdx.json"
    find . -path ./target -prune -o -name '*_bin.cdx.json' -newer "$stamp" -print0 | xargs -0r rm -f --
    rm -f "$stamp"
    echo "-- $bin built in $((SECONDS - started))s"
done

# The default plugins inside the gateway: the components this build compiled from plugins/guests,
# each present byte for byte in the binary (what a normal build embeds, built the same way).
for artefact in "${chosen[@]}"; do
    [[ "${artefact%%:*}" == gateway ]] || continue
    # plugins/build.rs builds them in `wasm-plugins` beside its own build's CACHEDIR.TAG, which
    # with --target is the target's folder.
    plugins="$TARGET_DIR/${artefact##*:}/wasm-plugins/wasm32-wasip2/release"
    python3 - "$OUT/gateway" "$plugins" "${EMBEDDED_PLUGINS[@]}" <<'EOF'
import hashlib, pathlib, sys
binary = pathlib.Path(sys.argv[1]).read_bytes()
folder = pathlib.Path(sys.argv[2])
for name in sys.argv[3:]:
    component = (folder / f"{name}.wasm").read_bytes()
    if component not in binary:
        sys.exit(f"the gateway does not embed {name}.wasm as built in {folder}")
    print(f"embedded: {name}.wasm {len(component)} bytes sha256:{hashlib.sha256(component).hexdigest()}")
EOF
    # Their own crates are not in the gateway's SBOM (plugins/build.rs builds them with a cargo of
    # its own): each embedded plugin gets an SBOM of its own beside it.
    stamp="$(mktemp)"
    cargo cyclonedx --manifest-path plugins/guests/Cargo.toml --format json --spec-version 1.5 \
        --target wasm32-wasip2 --quiet
    for sbom in $(find plugins/guests -path plugins/guests/target -prune -o -name '*.cdx.json' -newer "$stamp" -print); do
        plugin="$(basename "$(dirname "$sbom")")"
        if [[ " ${EMBEDDED_PLUGINS[*]} " == *" ${plugin//-/_} "* ]]; then
            mv "$sbom" "$OUT/gateway.plugin-$plugin.cdx.json"
        else
            rm -f "$sbom" # not in the binary
        fi
    done
    rm -f "$stamp"
done

(
    cd "$OUT"
    rm -f SHA256SUMS
    sha256sum -- $(ls | grep -v '^SHA256SUMS$' | sort) >SHA256SUMS
)
echo "== $OUT"
cat "$OUT/BUILDINFO"
cat "$OUT/SHA256SUMS"
