#!/usr/bin/env bash
# The compose stack (deploy/compose/docker-compose.yml) is a valid compose file: Debian's
# docker-compose reads it with the stack's .env (no container engine needed), and a copy with
# a mistake is refused, so this check is known to catch one.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../deploy/compose"

command -v docker-compose >/dev/null || {
    echo "docker-compose is not installed (scripts/test.sh installs Debian's package)" >&2
    exit 1
}
docker-compose -f docker-compose.yml config -q
services=$(docker-compose -f docker-compose.yml config --services | sort | tr '\n' ' ')
want="alertmanager enroll gateway-1 gateway-2 grafana nginx prometheus redis rig-1 rig-2 rig-3 "
if [[ $services != "$want" ]]; then
    echo "deploy/compose: services are '$services', expected '$want'" >&2
    exit 1
fi
for f in nginx.conf gateway.env rigs/node-runner.toml rigs/node-runner-flaky.toml; do
    [[ -s $f ]] || { echo "deploy/compose/$f is missing" >&2; exit 1; }
done

# The same check must fail on a broken file: a service option misspelled.
broken=$(mktemp -d)
trap 'rm -rf "$broken"' EXIT
cp -r . "$broken/"
sed -i '0,/    restart: unless-stopped/s//    restarts: unless-stopped/' "$broken/docker-compose.yml"
if docker-compose -f "$broken/docker-compose.yml" config -q 2>/dev/null; then
    echo "docker-compose accepted a compose file with a misspelled option: the check checks nothing" >&2
    exit 1
fi
echo "deploy/compose/docker-compose.yml: valid ($services)"
