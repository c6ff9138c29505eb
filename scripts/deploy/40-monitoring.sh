#!/usr/bin/env bash
# The compose stack's monitoring: Prometheus's config and alert rules pass promtool, the rules'
# unit tests pass (prometheus/tests), Alertmanager's config passes amtool, the Grafana provisioning and dashboards are well formed
# with every panel on the provisioned Prometheus, and every dashboard expression parses as
# PromQL. Each check is also run on a broken copy, which must fail. Seconds, no server started;
# tests/python/test_deploy_stack.py runs all of it against a live Prometheus.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../deploy/compose"

command -v promtool >/dev/null || {
    echo "promtool is not installed (scripts/test.sh installs Debian's prometheus)" >&2
    exit 1
}
command -v amtool >/dev/null || {
    echo "amtool is not installed (scripts/test.sh installs Debian's prometheus-alertmanager)" >&2
    exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# must_fail WHAT COMMAND...: the command must exit non-zero.
must_fail() {
    local what=$1
    shift
    if "$@" >"$work/out" 2>&1; then
        echo "$what was accepted: the check checks nothing" >&2
        cat "$work/out" >&2
        exit 1
    fi
}

promtool check config prometheus/prometheus.yml
promtool check rules prometheus/rules/*.yml
(cd prometheus/tests && promtool test rules ./*.test.yml)
amtool check-config alertmanager/alertmanager.yml
python3 grafana/check_dashboards.py

# Every dashboard expression parses: each becomes a recording rule for promtool to read
# (Grafana's interval variables given a value as Grafana would).
python3 grafana/check_dashboards.py --exprs | python3 -c '
import json, sys
print("groups:\n  - name: dashboards\n    rules:")
for i, line in enumerate(sys.stdin):
    e = json.loads(line)
    expr = e["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h")
    print(f"      - record: dashboard_expr_{i}\n        expr: {json.dumps(expr)}")
' >"$work/dashboards.rules.yml"
promtool check rules "$work/dashboards.rules.yml" >/dev/null
echo "dashboard expressions: $(grep -c 'record:' "$work/dashboards.rules.yml") parse as PromQL"

# Broken copies of each kind of file must fail the same checks.
cp -r prometheus grafana alertmanager "$work/"
sed -i 's/expr: up{job="gateway"} == 0/expr: up{job="gateway"} == == 0/' "$work/prometheus/rules/garage.yml"
must_fail "a rule with a PromQL syntax error" promtool check rules "$work/prometheus/rules/garage.yml"
cp prometheus/rules/garage.yml "$work/prometheus/rules/garage.yml"
sed -i 's/> 30$/> 300/' "$work/prometheus/rules/garage.yml"
must_fail "a heartbeat alert ten times too lax" \
    bash -c "cd '$work/prometheus/tests' && promtool test rules ./*.test.yml"
sed -i 's/scrape_interval: 15s/scrape_interval: 15 seconds/' "$work/prometheus/prometheus.yml"
must_fail "a scrape interval that is not a duration" promtool check config "$work/prometheus/prometheus.yml"
sed -i '0,/"uid": "garage-prometheus"/s//"uid": "prometheus-typo"/' "$work/grafana/dashboards/batch.json"
must_fail "a panel on a data source that is not provisioned" python3 "$work/grafana/check_dashboards.py" "$work/grafana"
sed -i 's/  receiver: stack$/  receiver: nobody/' "$work/alertmanager/alertmanager.yml"
must_fail "a route to a receiver that does not exist" amtool check-config "$work/alertmanager/alertmanager.yml"
echo "monitoring files: valid"
