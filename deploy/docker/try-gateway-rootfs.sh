#!/usr/bin/env bash
# The gateway image's final stage without a container engine: the files deploy/docker/
# gateway.Dockerfile puts in `scratch`, laid out in a temporary directory, and the released
# binary run there by chroot as 65532:65532 with the image's environment only. Needs root (for
# chroot) and a release (scripts/release.sh gateway). Not part of scripts/test.sh: it wants a
# release build, tens of minutes on 2 cores.
#
#   sudo deploy/docker/try-gateway-rootfs.sh [DIST] [PORT]
set -Eeuo pipefail
DIST="$(cd "${1:-dist}" && pwd)"
PORT="${2:-18080}"
ROOT="$(mktemp -d)"
chmod 0755 "$ROOT" # mktemp makes it 0700: the image's user must reach its files
gateway_pid=""
cleanup() {
    [[ -n "$gateway_pid" ]] && kill "$gateway_pid" 2>/dev/null || true
    rm -rf "$ROOT"
}
trap cleanup EXIT

# As the Dockerfile's build stage makes /rootfs, then the final stage's COPY of the binary.
mkdir -p "$ROOT"/etc "$ROOT"/tmp "$ROOT"/var/lib/garage "$ROOT"/usr/share/doc/garage "$ROOT"/usr/local/bin
chmod 1777 "$ROOT/tmp"
chown 65532:65532 "$ROOT/var/lib/garage"
echo 'garage:x:65532:65532:garage:/var/lib/garage:/sbin/nologin' >"$ROOT/etc/passwd"
echo 'garage:x:65532:' >"$ROOT/etc/group"
cp "$DIST"/*.cdx.json "$DIST"/BUILDINFO "$DIST"/SHA256SUMS "$ROOT/usr/share/doc/garage/"
install -m 0755 "$DIST/gateway" "$ROOT/usr/local/bin/gateway"
echo "image files: $(du -sh "$ROOT" | cut -f1)"

# The image's ENV, and nothing else from this shell.
IN_IMAGE=(env -i GARAGE_LISTEN="0.0.0.0:$PORT" GARAGE_AUTH_ADMIN_TOKEN_FILE=/var/lib/garage/admin-token
    /usr/sbin/chroot --userspec=65532:65532 "$ROOT" /usr/local/bin/gateway)
in_image() { "${IN_IMAGE[@]}" "$@"; }
if in_image health >/dev/null 2>&1; then
    echo "healthy before it started: is something else on port $PORT?" >&2
    exit 1
fi
# env and chroot exec: this pid is the gateway's.
"${IN_IMAGE[@]}" serve >"$ROOT.log" 2>&1 &
gateway_pid=$!
for _ in $(seq 150); do
    in_image health >/dev/null 2>&1 && break
    kill -0 "$gateway_pid" 2>/dev/null || { cat "$ROOT.log" >&2; exit 1; }
    sleep 0.2
done
in_image health
token="$(cat "$ROOT/var/lib/garage/admin-token")"
stat -c 'admin token: %a %u:%g %n' "$ROOT/var/lib/garage/admin-token"
curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$PORT/admin/plugins" |
    python3 -c '
import json, sys
slots = json.load(sys.stdin)["data"]
print("policies:", ", ".join(s["slot"] + " from " + s["active"]["activated_by"] for s in slots if s["active"]))'
grep VmRSS "/proc/$gateway_pid/status"
kill -TERM "$gateway_pid"
status=0
wait "$gateway_pid" || status=$?
echo "SIGTERM: exit $status"
[[ "$status" -eq 0 ]]
gateway_pid=""
rm -f "$ROOT.log"
