"""The compose stack (deploy/compose) as processes, with its own files: Redis, the two gateway
replicas with the environment docker-compose.yml gives them, nginx on the stack's nginx.conf,
three rigs on the stack's node-runner configs (simulated engines), and Debian's Prometheus and
Alertmanager on the stack's prometheus.yml, alert rules and alertmanager.yml. Only the
addresses change (each `service:port` of the stack becomes a free port on 127.0.0.1), the
scrape interval shortens, and two gateway settings the fixture explains.

Traffic goes through nginx (chats, streams, embeddings, a batch, a plugin that traps until the
gateway rolls it back), then every expression of every Grafana dashboard is run against
Prometheus and must return data, and every alert rule must evaluate without error on metrics
that exist. Then the hostile part: a rig that hangs shows its heartbeat ageing; a replica that
stops fires GarageGatewayDown, which reaches Alertmanager; with every rig gone and then Redis
gone, GarageNoHealthyRig and GarageStoreUnreachable go pending.

Needs, besides the gateway binary: node-runner beside it, redis-server, nginx, prometheus,
prometheus-alertmanager and docker-compose (scripts/test.sh installs them), and the
fixture_trap plugin the gateway's build makes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT, _free_port, _gateway_binary, _logs, _stop

COMPOSE = REPO_ROOT / "deploy" / "compose"
DASHBOARDS = COMPOSE / "grafana" / "dashboards"
CHAT_MODEL = "llama-3.1-8b-instruct"
EMBEDDING_MODEL = "bge-small-en"
# Scrapes and rule evaluations this often instead of the stack's 15 s.
SCRAPE_INTERVAL = "1s"
# What Grafana puts in its interval variables, for running the dashboards' expressions.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "10m", "$__interval": "1s"}
# Bounds on waiting for things that happen by themselves; none is expected to be reached.
WAIT_S = 30.0


def wait_for(what: str, check, bound: float = WAIT_S):
    """Polls `check` until it returns something truthy, which it returns; fails past `bound`."""
    deadline = time.monotonic() + bound
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {bound:.0f} s (last: {last!r})", pytrace=False)


def tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if not found:
        pytest.fail(f"{name} is not installed: scripts/test.sh installs it", pytrace=False)
    return found


def compose_services() -> dict:
    """docker-compose.yml as docker-compose reads it (with .env and env_file applied), as JSON.
    Read by Debian's docker-compose and turned into JSON by the Python it runs on, which has
    PyYAML (docker-compose needs it), so the test's own environment needs none."""
    rendered = subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE / "docker-compose.yml"), "config"],
        check=True, capture_output=True, text=True, cwd=COMPOSE,
    ).stdout
    compose_python = Path(tool("docker-compose")).read_text().splitlines()[0].removeprefix("#!")
    as_json = subprocess.run(
        [compose_python.strip(), "-c",
         "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=rendered, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(as_json)["services"]


def fixture_wasm(name: str) -> Path:
    """A plugin the gateway's build compiled (plugins/guests/fixtures)."""
    target = REPO_ROOT / "target"
    found = sorted(
        list((target / "wasm-plugins").glob(f"**/release/{name}.wasm"))
        + list((target / "debug" / "build").glob(f"*/out/**/{name}.wasm")),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        pytest.fail(f"{name}.wasm not found under target/: build the gateway first", pytrace=False)
    return found[-1]


@dataclass
class Stack:
    work: Path
    #: `service:port` of the compose stack -> `127.0.0.1:port` here.
    addresses: dict[str, str]
    admin_token: str
    procs: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)

    def rewrite(self, text: str) -> str:
        for compose, here in self.addresses.items():
            text = text.replace(compose, here)
        return text

    def url(self, service: str) -> str:
        return "http://" + self.addresses[service]

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None):
        """Starts a process of the stack with its output in `name`.log (shown when a test
        fails), `env` added to this process's environment."""
        log = self.work / f"{name}.log"
        _logs.setdefault("stack", []).append(log)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.work, env={**os.environ, "NO_COLOR": "1", **(env or {})},
            )
        self.procs[name] = (proc, log)
        return proc

    def stop(self, name: str, graceful: bool = True):
        proc, log = self.procs.pop(name)
        if graceful:
            _stop(proc, name, log)
        else:
            proc.kill()
            proc.wait()

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.admin_token}", **kw.pop("headers", {})}
        return httpx.request(method, self.url("nginx:8080") + path, headers=headers, timeout=30, **kw)

    def rules(self) -> list[dict]:
        """Prometheus's alert rules, with their health and state."""
        r = httpx.get(self.url("prometheus:9090") + "/api/v1/rules", timeout=30)
        return [rule for g in r.json()["data"]["groups"] for rule in g["rules"]]

    def alert_state(self, name: str) -> str:
        """inactive, pending or firing."""
        return next(r["state"] for r in self.rules() if r["name"] == name)

    def query(self, expr: str) -> dict:
        r = httpx.get(self.url("prometheus:9090") + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text}"
        return body["data"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    gateway_bin = _gateway_binary()
    node_runner_bin = gateway_bin.parent / "node-runner"
    if not node_runner_bin.is_file():
        pytest.fail(f"node-runner not found beside the gateway ({node_runner_bin}): "
                    "cargo build --workspace --bins", pytrace=False)
    services = compose_services()
    work = tmp_path_factory.mktemp("stack")
    addresses = {f"{s}:{p}": f"127.0.0.1:{_free_port()}" for s, p in (
        ("gateway-1", 8080), ("gateway-2", 8080), ("nginx", 8080), ("redis", 6379),
        ("prometheus", 9090), ("alertmanager", 9093))}
    gateway_env = {name: {k: str(v) for k, v in services[name]["environment"].items()}
                   for name in ("gateway-1", "gateway-2")}
    stack = Stack(work, addresses, gateway_env["gateway-1"]["GARAGE_AUTH_ADMIN_TOKEN"])
    try:
        redis_port = addresses["redis:6379"].rsplit(":", 1)[1]
        stack.start("redis", [tool("redis-server"), "--port", redis_port, "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"])

        for name, env in gateway_env.items():
            # The compose stack's environment, its addresses swapped for the test's.
            env = {k: stack.rewrite(v) for k, v in env.items()}
            assert env["GARAGE_LISTEN"] == "0.0.0.0:8080", env
            env["GARAGE_LISTEN"] = addresses[f"{name}:8080"]
            # Two settings that are not the stack's. The trial call at upload refuses a
            # router that traps on every call, and the test wants one to fault at run time
            # and be rolled back, as a plugin that faults only on real traffic would.
            env["GARAGE_PLUGINS_TRIAL_AT_UPLOAD"] = "false"
            # And rigs spot-checked within the test's seconds, not the default ten minutes,
            # for the rigs dashboard's checks panel.
            env["GARAGE_TRUST_SPOT_CHECK_INTERVAL_SECS"] = "3"
            stack.start(name, [str(gateway_bin), "serve"], env)
        for name in gateway_env:
            # /health only: /ready waits for a rig, and the rigs come through nginx.
            wait_for(f"{name} /health", lambda: _healthy(stack.url(f"{name}:8080")))

        conf = (COMPOSE / "nginx.conf").read_text()
        for upstream in ("gateway-1:8080", "gateway-2:8080"):
            assert f"server {upstream} " in conf, f"nginx.conf lost {upstream}"
        assert "listen 8080;" in conf and "pid /tmp/nginx.pid;" in conf
        conf = stack.rewrite(conf).replace(
            "listen 8080;", f"listen {addresses['nginx:8080']};").replace(
            "pid /tmp/nginx.pid;", "pid nginx.pid;")
        (work / "nginx").mkdir()
        (work / "nginx" / "nginx.conf").write_text(conf)
        stack.start("nginx", [tool("nginx"), "-p", str(work / "nginx"), "-c",
                              str(work / "nginx" / "nginx.conf"), "-g", "daemon off;"])
        wait_for("nginx", lambda: _healthy(stack.url("nginx:8080")))

        made = stack.admin("POST", "/admin/enrollment-tokens",
                           json={"operator": "compose", "max_uses": 3})
        assert made.status_code in (200, 201), made.text
        token = made.json()["token"]
        for i, config in ((1, "node-runner.toml"), (2, "node-runner.toml"),
                          (3, "node-runner-flaky.toml")):
            text = (COMPOSE / "rigs" / config).read_text()
            assert 'gateway_url = "http://nginx:8080"' in text and "port = 8001" in text
            # Three rigs on one machine: each engine on a free port (simulated engines only).
            text = stack.rewrite(text).replace("port = 8001", "port = 0")
            path = work / f"rig-{i}.toml"
            path.write_text(text)
            stack.start(f"rig-{i}", [str(node_runner_bin), "run", "--config", str(path)], {
                "NODE_RUNNER_ENROLLMENT_TOKEN": token,
                "NODE_RUNNER_STATE_FILE": str(work / f"rig-{i}-state.json"),
                "NODE_RUNNER_NAME": f"rig-{i}",
            })
        wait_for("three rigs routable", lambda: sum(
            1 for n in stack.admin("GET", "/admin/nodes").json()["data"] if n["routable"]) == 3)

        shutil.copytree(COMPOSE / "alertmanager", work / "alertmanager")
        stack.start("alertmanager", [
            tool("prometheus-alertmanager"),
            f"--config.file={work / 'alertmanager' / 'alertmanager.yml'}",
            f"--storage.path={work / 'alertmanager' / 'data'}",
            f"--web.listen-address={addresses['alertmanager:9093']}",
            # One Alertmanager: no gossip port to find free.
            "--cluster.listen-address=",
        ])
        wait_for("alertmanager", lambda: _healthy(stack.url("alertmanager:9093"), "/-/ready"))

        prom = work / "prometheus"
        shutil.copytree(COMPOSE / "prometheus", prom)
        config = (prom / "prometheus.yml").read_text()
        assert config.count("interval: 15s") == 2, "prometheus.yml's intervals moved"
        (prom / "prometheus.yml").write_text(
            stack.rewrite(config).replace("interval: 15s", f"interval: {SCRAPE_INTERVAL}"))
        rules = (prom / "rules" / "garage.yml").read_text()
        down = "expr: up{job=\"gateway\"} == 0\n        for: 1m"
        assert down in rules, "GarageGatewayDown changed: update the test's copy"
        # A short `for` in the test's copy, to see it fire within the test.
        (prom / "rules" / "garage.yml").write_text(rules.replace(down, down[:-2] + "2s"))
        stack.start("prometheus", [
            tool("prometheus"), f"--config.file={prom / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom / 'data'}",
            f"--web.listen-address={addresses['prometheus:9090']}",
        ])
        wait_for("prometheus", lambda: _healthy(stack.url("prometheus:9090"), "/-/ready"))
        yield stack
    finally:
        for name in reversed(list(stack.procs)):
            proc, _ = stack.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _healthy(base: str, path: str = "/health") -> bool:
    try:
        return httpx.get(base + path, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _chat(client: httpx.Client, base: str, key: str, stream: bool = False) -> None:
    body = {"model": CHAT_MODEL, "max_tokens": 4, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {key}"}
    if stream:
        with client.stream("POST", base + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            assert b"data: [DONE]" in b"".join(r.iter_bytes())
    else:
        r = client.post(base + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text


def _metrics_of_replicas(stack: Stack) -> str:
    return "".join(httpx.get(stack.url(f"gateway-{i}:8080") + "/metrics", timeout=10).text
                   for i in (1, 2))


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel, expression) of every target of every dashboard."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
    assert len({d for d, _, _ in found}) == 5, "a dashboard has no targets"
    return found


def test_the_stack_serves_and_its_dashboards_and_alerts_see_it(stack: Stack):
    base = stack.url("nginx:8080")
    created = stack.admin("POST", "/admin/keys", json={"name": "stack"})
    assert created.status_code in (200, 201), created.text
    key = created.json()["key"]

    with httpx.Client(timeout=30) as client:
        # What nginx keeps to the replicas: the internal channel and the metrics.
        for path in ("/metrics", "/internal/rigs/x/v1/chat/completions"):
            r = client.get(base + path)
            assert r.status_code == 404 and "error" in r.json(), (path, r.text)

        for i in range(6):
            _chat(client, base, key, stream=i % 2 == 1)
        r = client.post(base + "/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                        json={"model": EMBEDDING_MODEL, "input": ["a", "b"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text

        # rig-3 fails one request in ten: chats until one did (the gateway retried it on
        # another rig, so every chat still succeeds) and the backend error is counted.
        for _ in range(300):
            if "garage_backend_errors_total{" in _metrics_of_replicas(stack):
                break
            _chat(client, base, key)
        else:
            pytest.fail("300 chats and rig-3's engine never failed one")

        # A batch, run by the rigs.
        lines = "".join(json.dumps({
            "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": CHAT_MODEL, "max_tokens": 4,
                     "messages": [{"role": "user", "content": f"line {i}"}]},
        }) + "\n" for i in range(6))
        auth = {"Authorization": f"Bearer {key}"}
        upload = client.post(base + "/v1/files", headers=auth, data={"purpose": "batch"},
                             files={"file": ("batch.jsonl", lines, "application/jsonl")})
        assert upload.status_code == 200, upload.text
        batch = client.post(base + "/v1/batches", headers=auth, json={
            "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert batch.status_code == 200, batch.text
        batch_id = batch.json()["id"]
        wait_for("the batch to complete", lambda: client.get(
            f"{base}/v1/batches/{batch_id}", headers=auth).json()["status"] == "completed")

        # A router that traps on every call: requests fall back to round robin, and repeated
        # faults roll the slot back (per replica, so chats until it happened).
        def router_sha():
            slots = stack.admin("GET", "/admin/plugins").json()["data"]
            return next(s for s in slots if s["slot"] == "router")["active"]["sha256"]
        before = router_sha()
        trap = stack.admin("PUT", "/admin/plugins/router",
                           content=fixture_wasm("fixture_trap").read_bytes(),
                           headers={"Content-Type": "application/wasm"})
        assert trap.status_code == 200, trap.text
        assert trap.json()["sha256"] != before

        def rolled_back():
            _chat(client, base, key)
            return "garage_plugin_rollbacks_total{" in _metrics_of_replicas(stack)
        wait_for("an automatic rollback of the trapping router", rolled_back)
        assert router_sha() == before, "the rollback did not bring the default router back"

    # Every dashboard expression returns data from the stack's Prometheus. Scrapes come every
    # second: wait for each to have what it needs (rates need two samples).
    exprs = dashboard_exprs()
    for dashboard, panel, expr in exprs:
        query = expr
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"{dashboard} / {panel}: unknown variable in {expr}"
        wait_for(f"{dashboard} / {panel}: data for {query}",
                 lambda: stack.query(query)["result"])

    # Every alert rule is loaded, evaluates without error, and watches metrics that exist.
    def evaluated_rules():
        rules = stack.rules()
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None
    rules = wait_for("every rule evaluated", evaluated_rules)
    assert {r["name"] for r in rules} == {
        "GarageGatewayDown", "GarageHighErrorRate", "GarageSlowFirstToken", "GarageNoHealthyRig",
        "GarageRigHeartbeatsMissing", "GarageStoreUnreachable", "GaragePluginFaulting",
        "GaragePluginRolledBack", "GarageBatchBacklogGrowing"}
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        stack.query(rule["query"])
        for metric in set(re.findall(r"\b(garage_[a-z_]+|up)\b(?=\s*[{\[)]|\s*==)", rule["query"])):
            assert stack.query(f'count({{__name__="{metric}"}})')["result"], (
                f"{rule['name']} watches {metric}, which no target exports")
    # Healthy stack: the faults of the trapping router fired their two alerts, nothing else did.
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert firing <= {"GaragePluginFaulting", "GaragePluginRolledBack"}, firing

    # A replica stops: Prometheus sees it down and the alert fires (for: 2s in this copy);
    # nginx sends requests to the other one, its rigs reconnect there.
    stack.stop("gateway-2")
    gone = stack.addresses["gateway-2:8080"]

    def gateway_down_firing():
        alerts = httpx.get(stack.url("prometheus:9090") + "/api/v1/alerts").json()["data"]["alerts"]
        return any(a["labels"]["alertname"] == "GarageGatewayDown"
                   and a["labels"]["instance"] == gone and a["state"] == "firing" for a in alerts)
    wait_for("GarageGatewayDown firing for the stopped replica", gateway_down_firing)

    def gateway_down_received():
        alerts = httpx.get(stack.url("alertmanager:9093") + "/api/v2/alerts").json()
        return any(a["labels"]["alertname"] == "GarageGatewayDown"
                   and a["labels"]["instance"] == gone and a["labels"]["severity"] == "critical"
                   for a in alerts)
    wait_for("GarageGatewayDown received by Alertmanager", gateway_down_received)
    wait_for("three rigs routable on the remaining replica", lambda: sum(
        1 for n in stack.admin("GET", "/admin/nodes").json()["data"] if n["routable"]) == 3)
    with httpx.Client(timeout=30) as client:
        _chat(client, base, key, stream=True)

    # A rig that hangs (SIGSTOP: its tunnel stays open, its heartbeats stop) ages past the
    # heartbeat interval (5 s) while the others keep reporting.
    hung = stack.procs["rig-1"][0]
    node_of = {n["name"]: n["id"] for n in stack.admin("GET", "/admin/nodes").json()["data"]}
    hung.send_signal(signal.SIGSTOP)
    try:
        ages = lambda: {s["metric"]["node"]: float(s["value"][1]) for s in stack.query(  # noqa: E731
            "max by (node) (garage_rig_heartbeat_age_seconds)")["result"]}
        wait_for("rig-1's heartbeat age past 10 s", lambda: ages().get(node_of["rig-1"], 0) > 10)
        assert all(age < 10 for node, age in ages().items() if node != node_of["rig-1"]), ages()
    finally:
        hung.send_signal(signal.SIGCONT)

    # Every rig leaves: each model reads 0 healthy backends (it does not vanish) and
    # GarageNoHealthyRig is on its way (for: 2m).
    for i in (1, 2, 3):
        stack.stop(f"rig-{i}")
    wait_for("no healthy backend for either model", lambda: {
        s["metric"]["model"] for s in stack.query(
            'max by (model) (garage_model_backends{state="healthy"}) == 0')["result"]
    } == {CHAT_MODEL, EMBEDDING_MODEL})
    wait_for("GarageNoHealthyRig pending", lambda: stack.alert_state("GarageNoHealthyRig") == "pending")
    assert stack.query("sum(garage_rigs_connected)")["result"][0]["value"][1] == "0"

    # Redis goes away: the replica still answers its scrapes, saying so, and
    # GarageStoreUnreachable is on its way (for: 1m).
    stack.stop("redis")
    kept = stack.addresses["gateway-1:8080"]
    wait_for("garage_store_up 0", lambda: stack.query(
        f'garage_store_up{{instance="{kept}"}} == 0')["result"])
    wait_for("GarageStoreUnreachable pending",
             lambda: stack.alert_state("GarageStoreUnreachable") == "pending")
    assert stack.query(f'up{{instance="{kept}"}} == 1')["result"], "the scrape failed with Redis away"

