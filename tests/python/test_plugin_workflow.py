"""`garage plugin` end to end, for a reward scheme in Rust, Python and JavaScript, against a
real `gateway demo`: new -> test (native tests, then the component in wasmtime) -> build ->
replay -> push --canary -> promote, and the refusals around them.

The `garage` binary is `$GARAGE_CLI_BIN` if set, else target/debug/garage (built by
`cargo build --workspace --bins`, as scripts/test.sh does). The tools are installed as an
author's first run installs them, except that where scripts/build-plugins-polyglot.sh already
fetched the same pinned versions (.venv-plugins, plugins/js/reward/node_modules) they are
reused (GARAGE_PLUGIN_VENV, GARAGE_PLUGIN_NODE_MODULES) to keep the run short; the Rust
project builds in target/plugin-workflow, kept between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import (ADMIN_TOKEN, API_KEY, CHAT_MODELS, REPO_ROOT, _free_port, _gateway_binary,
                      _logs, _start, _stop, _wait_until_up)

LANGS = ("rust", "python", "js")
# A Python or JavaScript component build takes ~15-20 s on a 2-core machine, its first wasmtime
# compile as long; the Rust project's first build compiles its dependencies (~80 s).
TOOL_TIMEOUT_S = 600
# The gateway compiles an uploaded component before it answers.
ADMIN_TIMEOUT_S = 180
# How long a served request's usage may take to reach the reward slot (and its recording).
REPLAY_WAIT_S = 30


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    """A `gateway demo` of this module's own: the slots it swaps stay out of the session's
    shared gateway, which other tests use as it starts."""
    work = tmp_path_factory.mktemp("plugin-gateway")
    log = work / "gateway.log"
    _logs["gateway"] = [log]
    token_file = work / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    port = _free_port()
    proc = _start([str(_gateway_binary()), "demo", "--listen", f"127.0.0.1:{port}",
                   "--api-key", API_KEY, "--admin-token-file", str(token_file), "--nodes", "1",
                   "--ttft-ms", "0", "--tokens-per-sec", "0"], log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, base_url, log)
        yield base_url
    finally:
        _stop(proc, "the plugin workflow's gateway", log)


def _garage_binary() -> Path:
    configured = os.environ.get("GARAGE_CLI_BIN")
    binary = Path(configured) if configured else REPO_ROOT / "target" / "debug" / "garage"
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not binary.is_file():
        pytest.fail(f"garage binary not found at {binary}: `cargo build -p garage-cli`",
                    pytrace=False)
    return binary


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["GARAGE_ADMIN_TOKEN"] = ADMIN_TOKEN
    env["CARGO_TARGET_DIR"] = str(REPO_ROOT / "target" / "plugin-workflow")
    venv = REPO_ROOT / ".venv-plugins"
    if (venv / "bin" / "componentize-py").is_file():
        env["GARAGE_PLUGIN_VENV"] = str(venv)
    node_modules = REPO_ROOT / "plugins" / "js" / "reward" / "node_modules"
    if (node_modules / "@bytecodealliance" / "componentize-js").is_dir():
        env["GARAGE_PLUGIN_NODE_MODULES"] = str(node_modules)
    return env


def garage(*args: str, cwd: Path | None = None, timeout: float = ADMIN_TIMEOUT_S,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(_garage_binary()), *args], cwd=cwd, env=env or _tool_env(), capture_output=True,
        text=True, timeout=timeout, check=False,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One reward project per language, made by `garage plugin new` and passed through
    `garage plugin test`; the component each `garage plugin build` printed."""
    work = tmp_path_factory.mktemp("plugins")
    components = {}
    for lang in LANGS:
        name = f"pay-{lang}"
        assert ok(garage("plugin", "new", "reward", name, "--lang", lang, cwd=work)).strip() == name
        project = work / name
        tested = garage("plugin", "test", cwd=project, timeout=TOOL_TIMEOUT_S)
        ok(tested)
        # Native tests and every sample call passed, in wasmtime.
        assert "4 of 4 sample calls answered as expected" in tested.stderr, tested.stderr
        built = Path(ok(garage("plugin", "build", str(project), timeout=TOOL_TIMEOUT_S)).strip())
        assert built == project / "dist" / f"{name}.wasm"
        assert built.read_bytes()[:8] == b"\0asm\x0d\x00\x01\x00", "a component"
        components[lang] = built
    return components



@pytest.mark.parametrize("slot,samples", [("router", 4), ("rate-limiter", 6)])
@pytest.mark.parametrize("lang", ["python", "js"])
def test_router_and_rate_limiter_templates_pass_their_tests(tmp_path, lang, slot, samples):
    """`garage plugin new` then `garage plugin test` for the Python and JavaScript router and
    rate-limiter templates: native tests, then every sample call in wasmtime."""
    name = f"t-{slot}-{lang}"
    assert ok(garage("plugin", "new", slot, name, "--lang", lang, cwd=tmp_path)).strip() == name
    tested = garage("plugin", "test", cwd=tmp_path / name, timeout=TOOL_TIMEOUT_S)
    ok(tested)
    assert f"{samples} of {samples} sample calls answered as expected" in tested.stderr, tested.stderr

def test_a_broken_policy_fails_its_tests_with_the_test_status(projects):
    """`garage plugin test` exits 5 when the policy no longer pays what its native tests expect
    (each language), and when its component no longer answers what samples.json expects."""
    edits = {
        "rust": ("src/lib.rs", '"tokens"))', '"token"))'),
        "python": ("policy.py", '"tokens")', '"token")'),
        "js": ("policy.js", "'tokens')", "'token')"),
    }
    for lang, component in projects.items():
        project = component.parent.parent
        path, old, new = edits[lang]
        source = project / path
        original = source.read_text()
        assert old in original, (lang, path)
        source.write_text(original.replace(old, new))
        try:
            native = garage("plugin", "test", cwd=project, timeout=TOOL_TIMEOUT_S)
            assert native.returncode == 5, (lang, native.stderr)
            if lang == "rust":
                # The component check alone catches it too (a Rust build takes seconds).
                only_component = garage("plugin", "test", "--no-native", cwd=project,
                                        timeout=TOOL_TIMEOUT_S)
                assert only_component.returncode == 5, only_component.stderr
                assert "FAIL verified work pays by model weight" in only_component.stderr
        finally:
            source.write_text(original)
        # Back as it was, the component pushed below is the one that passed.
        ok(garage("plugin", "build", str(project), timeout=TOOL_TIMEOUT_S))


def _serve_one_request(gateway: str) -> None:
    """A chat request, whose usage event the reward slot is called with (and records)."""
    with httpx.Client(timeout=30) as http:
        answer = http.post(f"{gateway}/v1/chat/completions",
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": CHAT_MODELS[0], "max_tokens": 5,
                                 "messages": [{"role": "user", "content": "hello"}]})
    assert answer.status_code == 200, answer.text


def _replay(component: Path, config: str, base: list[str]) -> dict:
    return json.loads(ok(garage("plugin", "replay", "reward", str(component), "--config", config,
                                "--json", *base)))


def test_replay_then_canary_then_promote(projects, gateway):
    base = ["--url", gateway]
    config = json.dumps({"points_per_1k_tokens": 2, "points_per_uptime_hour": 1})
    _serve_one_request(gateway)
    for lang, component in projects.items():
        if lang == "rust":
            # The reward call comes off the usage queue, after the answer: wait for it, bounded
            # (a Rust component compiles in milliseconds, so asking again is cheap).
            deadline = time.monotonic() + REPLAY_WAIT_S
            answer = _replay(component, config, base)
            while answer["replayed"] == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
                answer = _replay(component, config, base)
            text = ok(garage("plugin", "replay", "reward", str(component), "--config", config,
                             *base))
            assert text.strip() and all(line.strip() for line in text.splitlines()), text
        else:
            answer = _replay(component, config, base)
        assert answer["replayed"] >= 1, answer
        assert answer["slot"] == "reward" and "reward" in answer["diff"], answer
        assert answer["candidate"] == hashlib.sha256(component.read_bytes()).hexdigest()
        assert answer["summary"], answer

        sha = ok(garage("plugin", "push", "reward", str(component), "--config", config,
                        "--canary", "10", *base)).strip()
        assert len(sha) == 64, sha
        status = json.loads(ok(garage("plugin", "status", "reward", "--json", *base)))
        assert status["canary"]["sha256"] == sha and status["canary"]["percent"] == 10, status
        line = ok(garage("plugin", "status", "reward", *base))
        assert f"canary {sha[:12]} 10%" in line, line

        assert ok(garage("plugin", "promote", "reward", *base)).strip() == sha
        status = json.loads(ok(garage("plugin", "status", "reward", "--json", *base)))
        assert status["active"]["sha256"] == sha and status["canary"] is None, status
        assert status["active"]["config"] == json.loads(config), status


def test_admin_refusals_are_clear(projects, gateway, tmp_path):
    base = ["--url", gateway]
    component = projects["rust"]

    # No canary to promote: the gateway's 400, said by the command.
    promoted = garage("plugin", "promote", "reward", *base)
    assert promoted.returncode == 1 and "HTTP 400" in promoted.stderr, promoted.stderr

    # A reward component in the router slot: refused by the gateway, which names the world.
    wrong = garage("plugin", "push", "router", str(component), *base)
    assert wrong.returncode == 1 and "HTTP 400" in wrong.stderr, wrong.stderr

    # A replay of more calls than the gateway keeps: its 400 names the limit.
    too_many = garage("plugin", "replay", "reward", str(component), "--limit", "20000", *base)
    assert too_many.returncode == 1 and "limit" in too_many.stderr, too_many.stderr

    # A core module, a text file, bad config JSON: refused before anything is sent.
    module = tmp_path / "module.wasm"
    module.write_bytes(b"\0asm\x01\x00\x00\x00")
    refused = garage("plugin", "push", "reward", str(module), *base)
    assert refused.returncode == 1 and "not a component" in refused.stderr, refused.stderr
    bad_config = garage("plugin", "push", "reward", str(component), "--config", "{x", *base)
    assert bad_config.returncode == 1 and "not JSON" in bad_config.stderr, bad_config.stderr

    # No token, a wrong token.
    env = _tool_env()
    del env["GARAGE_ADMIN_TOKEN"]
    none = garage("plugin", "status", *base, env=env)
    assert none.returncode == 1 and "GARAGE_ADMIN_TOKEN" in none.stderr, none.stderr
    env["GARAGE_ADMIN_TOKEN"] = "not-the-token"
    wrong_token = garage("plugin", "status", *base, env=env)
    assert wrong_token.returncode == 1 and "HTTP 401" in wrong_token.stderr, wrong_token.stderr

    # Rollback undoes the last promotion: the slot serves the version before it.
    before = json.loads(ok(garage("plugin", "status", "reward", "--json", *base)))
    back = ok(garage("plugin", "rollback", "reward", *base)).strip()
    assert back == before["history"][-1]["sha256"], before
    with httpx.Client(timeout=10) as http:
        listed = http.get(f"{gateway}/admin/plugins",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    reward = next(slot for slot in listed["data"] if slot["slot"] == "reward")
    assert reward["active"]["sha256"] == back


def test_new_refuses_what_it_cannot_make(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = garage("plugin", "new", "reward", "taken", "--lang", "rust", cwd=tmp_path)
    assert result.returncode == 1 and "not empty" in result.stderr, result.stderr
    assert (taken / "keep.txt").read_text() == "mine"
    result = garage("plugin", "new", "reward", "Bad_Name", "--lang", "python", cwd=tmp_path)
    assert result.returncode == 1 and "bad name" in result.stderr, result.stderr
    result = garage("plugin", "new", "nope", "fast", "--lang", "js", cwd=tmp_path)
    assert result.returncode == 2 and "invalid value 'nope'" in result.stderr, result.stderr
    assert not (tmp_path / "fast").exists()
    result = garage("plugin", "new", "reward", "x", "--lang", "rust", "--sdk", str(tmp_path),
                    cwd=tmp_path)
    assert result.returncode == 1 and "not the Garage SDK" in result.stderr, result.stderr
    result = garage("plugin", "test", str(tmp_path))
    assert result.returncode == 1 and "garage plugin new" in result.stderr, result.stderr


def test_the_component_check_refuses_what_it_cannot_call(projects, tmp_path):
    """`garage plugin test --component`: a component of another world fails the check (exit 5)
    saying what it lacks; a file that is not a component and a samples file with a misspelled
    field are errors that say so (exit 1)."""
    project = projects["rust"].parent.parent
    meters = sorted((REPO_ROOT / "target" / "wasm-plugins").glob("wasm32-wasip2/release/meter.wasm"))
    assert meters, "the default plugins are built with the workspace (cargo build -p garage-plugins)"
    other_world = garage("plugin", "test", "--component", str(meters[0]), cwd=project)
    assert other_world.returncode == 5, other_world.stderr
    assert "does not export on-usage, on-report" in other_world.stderr, other_world.stderr

    module = tmp_path / "module.wasm"
    module.write_bytes(b"\0asm\x01\x00\x00\x00")
    not_one = garage("plugin", "test", "--component", str(module), cwd=project)
    assert not_one.returncode == 1, not_one.stderr
    assert "not a component wasmtime can load" in not_one.stderr, not_one.stderr

    samples = json.loads((project / "samples.json").read_text())
    samples["calls"][0]["on-usage"][0]["operater"] = "alice"
    bad = tmp_path / "samples.json"
    bad.write_text(json.dumps(samples))
    typo = garage("plugin", "test", "--component", str(projects["rust"]), "--samples", str(bad),
                  cwd=project)
    assert typo.returncode == 1 and "unknown field `operater`" in typo.stderr, typo.stderr


def test_a_meter_from_new_to_promoted(gateway, tmp_path):
    """The meter template (Rust here; the Python and JavaScript ones build the same way) from
    `new` to the active version of the gateway's meter slot."""
    base = ["--url", gateway]
    ok(garage("plugin", "new", "meter", "price-rust", "--lang", "rust", cwd=tmp_path))
    project = tmp_path / "price-rust"
    tested = garage("plugin", "test", cwd=project, timeout=TOOL_TIMEOUT_S)
    assert "3 of 3 sample calls answered as expected" in ok(tested) + tested.stderr
    component = project / "dist" / "price-rust.wasm"
    config = json.dumps({"prompt_per_1k": 0.5, "completion_per_1k": 1.5})
    sha = ok(garage("plugin", "push", "meter", str(component), "--config", config,
                    "--canary", "50", *base)).strip()
    assert ok(garage("plugin", "promote", "meter", *base)).strip() == sha
    status = json.loads(ok(garage("plugin", "status", "meter", "--json", *base)))
    assert status["active"]["sha256"] == sha and status["active"]["config"] == json.loads(config)


def test_a_router_from_new_to_promoted_and_a_rate_limiter_tested(gateway, tmp_path):
    """The Rust router template from `new` to the active version of the router slot, and the
    Rust rate limiter through its native tests and its sample calls in wasmtime (its counts go
    on from call to call in the in-memory kv)."""
    base = ["--url", gateway]
    ok(garage("plugin", "new", "router", "route-rust", "--lang", "rust", cwd=tmp_path))
    project = tmp_path / "route-rust"
    tested = garage("plugin", "test", cwd=project, timeout=TOOL_TIMEOUT_S)
    assert "4 of 4 sample calls answered as expected" in ok(tested) + tested.stderr
    component = Path(ok(garage("plugin", "build", str(project), timeout=TOOL_TIMEOUT_S)).strip())
    assert component == project / "dist" / "route-rust.wasm"
    sha = ok(garage("plugin", "push", "router", str(component), "--canary", "10", *base)).strip()
    assert ok(garage("plugin", "promote", "router", *base)).strip() == sha
    status = json.loads(ok(garage("plugin", "status", "router", "--json", *base)))
    assert status["active"]["sha256"] == sha

    ok(garage("plugin", "new", "rate-limiter", "limit-rust", "--lang", "rust", cwd=tmp_path))
    limiter = tmp_path / "limit-rust"
    tested = garage("plugin", "test", cwd=limiter, timeout=TOOL_TIMEOUT_S)
    assert "6 of 6 sample calls answered as expected" in ok(tested) + tested.stderr
    # Hostile: a sample that expects the third request of the minute through fails the test.
    samples = json.loads((limiter / "samples.json").read_text())
    samples["calls"][2]["expect"] = {"decision": {"allow": True}}
    (limiter / "samples.json").write_text(json.dumps(samples))
    failed = garage("plugin", "test", cwd=limiter, timeout=TOOL_TIMEOUT_S)
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "5 of 6 sample calls answered as expected" in failed.stdout + failed.stderr
