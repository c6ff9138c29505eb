#!/usr/bin/env bash
# The dependency policy (deny.toml: licences, bans, crates.io as the only source) for both
# workspaces: ours, and the plugins' (plugins/guests), whose crates the gateway embeds. Then
# proof that the policy refuses: a crate under a copyleft licence fails the licence check.
# Advisories need GitHub (docs/supply-chain.md). cargo-deny is installed by .ci/run; where it is
# missing this says so and passes, so that scripts/test.sh needs no extra tool.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if ! cargo deny --version >/dev/null 2>&1; then
    echo "cargo-deny is not installed: skipped (.ci/run installs it; see docs/supply-chain.md)"
    exit 0
fi
deny() {
    cargo deny --log-level error "$@" check --hide-inclusion-graph licenses bans sources
}
deny --config deny.toml
deny --config deny.toml --manifest-path plugins/guests/Cargo.toml
echo "deny.toml: both workspaces pass (licenses, bans, sources)"

hostile="$(mktemp -d)"
trap 'rm -rf "$hostile"' EXIT
mkdir -p "$hostile/src"
printf '[package]\nname = "copyleft"\nversion = "0.1.0"\nedition = "2024"\nlicense = "GPL-3.0-only"\n' \
    >"$hostile/Cargo.toml"
: >"$hostile/src/lib.rs"
(cd "$hostile" && cargo generate-lockfile --offline -q)
if verdict="$(deny --config "$PWD/deny.toml" --manifest-path "$hostile/Cargo.toml" --offline 2>&1)"; then
    echo "deny.toml let a GPL-3.0-only crate through" >&2
    exit 1
fi
if ! grep -q "licenses FAILED" <<<"$verdict"; then
    echo "cargo deny failed on the GPL-3.0-only crate, but not for its licence:" >&2
    echo "$verdict" >&2
    exit 1
fi
echo "deny.toml: a GPL-3.0-only crate is refused"
