"""Starts the real gateway once per session for the OpenAI SDK tests: `gateway demo` for most,
and `gateway serve` over HTTPS in front of a simulated engine serving HTTPS for the TLS ones.

The binary is `$GARAGE_GATEWAY_BIN` if set, else `target/debug/gateway` under the repository
root (build it with `cargo build -p garage-gateway`). Its stdout and stderr go to a log file whose
path, and last lines, are shown with every failing test.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

API_KEY = "sk-garage-pytest"
ADMIN_TOKEN = "admin-pytest"
CHAT_MODELS = ("llama-3.1-8b-instruct", "qwen2.5-7b-instruct")
EMBEDDING_MODEL = "bge-small-en"
DEMO_MODELS = (*CHAT_MODELS, EMBEDDING_MODEL)

STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 60

# The logs of the processes each fixture started, so that a failing test's report shows those
# it used.
_logs: dict[str, list[Path]] = {}


def _gateway_binary() -> Path:
    configured = os.environ.get("GARAGE_GATEWAY_BIN")
    binary = Path(configured) if configured else REPO_ROOT / "target" / "debug" / "gateway"
    if not binary.is_absolute():
        # Relative paths are taken from the repository root, wherever pytest runs from.
        binary = REPO_ROOT / binary
    if not binary.is_file() or not os.access(binary, os.X_OK):
        how = "$GARAGE_GATEWAY_BIN" if configured else "the default path"
        pytest.fail(
            f"gateway binary not found at {binary} ({how}). Build it first with "
            "`cargo build -p garage-gateway`, or point GARAGE_GATEWAY_BIN at it.",
            pytrace=False,
        )
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return "(no gateway log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _wait_until_up(
    proc: subprocess.Popen, base_url: str, log: Path, verify: ssl.SSLContext | bool = True
) -> None:
    """Polls /health, then /ready, until both answer 200; bounded by STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = "no answer yet"
    with httpx.Client(timeout=2.0, verify=verify) as http:
        for path in ("/health", "/ready"):
            while True:
                if proc.poll() is not None:
                    pytest.fail(
                        f"the gateway exited with code {proc.returncode} while starting.\n"
                        f"log ({log}):\n{_log_tail(log)}",
                        pytrace=False,
                    )
                try:
                    response = http.get(base_url + path)
                    if response.status_code == 200:
                        break
                    last_error = f"{path} answered {response.status_code}: {response.text}"
                except httpx.TransportError as err:
                    last_error = f"{path}: {err!r}"
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the gateway did not come up within {STARTUP_TIMEOUT_S:.0f} s "
                        f"({last_error}).\nlog ({log}):\n{_log_tail(log)}",
                        pytrace=False,
                    )
                time.sleep(0.05)


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """Starts one of the workspace's binaries with its output in `log`."""
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("NO_COLOR", "1")
    with open(log, "wb") as log_file:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )


def _stop(proc: subprocess.Popen, what: str, log: Path) -> None:
    """SIGTERM, then requires a clean exit (code 0) within SHUTDOWN_TIMEOUT_S: graceful shutdown
    is part of what these tests check."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(
                f"{what} did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM.\n"
                f"log ({log}):\n{_log_tail(log)}",
                pytrace=False,
            )
    else:
        code = proc.returncode
    assert code == 0, (
        f"{what} exited with code {code} after SIGTERM (graceful shutdown must exit 0).\n"
        f"log ({log}):\n{_log_tail(log)}"
    )


@pytest.fixture(scope="session")
def gateway_url(tmp_path_factory: pytest.TempPathFactory):
    """Base URL (no /v1) of a `gateway demo` running for the whole session; stopped with SIGTERM,
    it must exit 0."""
    binary = _gateway_binary()
    port = _free_port()
    work = tmp_path_factory.mktemp("gateway")
    log = work / "gateway.log"
    _logs["gateway_url"] = [log]
    # The admin token goes in a file: a command-line argument is readable by every local user.
    token_file = work / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    proc = _start(
        [
            str(binary),
            "demo",
            "--listen", f"127.0.0.1:{port}",
            "--api-key", API_KEY,
            "--admin-token-file", str(token_file),
            "--nodes", "2",
            "--ttft-ms", "0",
            "--tokens-per-sec", "0",
        ],
        log,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, base_url, log)
        yield base_url
    finally:
        _stop(proc, "the gateway", log)


@dataclass(frozen=True)
class TlsGateway:
    """A gateway serving HTTPS in front of a simulated engine that serves HTTPS too."""

    base_url: str
    #: The PEM of the test CA that issued both servers' certificates.
    ca_file: Path
    #: An API key made through the admin API.
    api_key: str


# With a slash, as vLLM names models after their Hugging Face ids.
TLS_MODEL = "garage-tests/sim-tls-chat"


@pytest.fixture(scope="session")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory):
    """`gateway serve` with `tls_cert_file`/`tls_key_file`, its one upstream a `sim-engine` started
    with `--ssl-certfile` (the way vLLM serves HTTPS) and trusted through `dispatch.tls_ca_file`:
    both hops are TLS, verified against a CA made for this session (trustme), on 127.0.0.1."""
    import trustme

    binary = _gateway_binary()
    engine_binary = Path(os.environ.get("GARAGE_SIM_ENGINE_BIN", binary.parent / "sim-engine"))
    if not engine_binary.is_absolute():
        engine_binary = REPO_ROOT / engine_binary
    if not engine_binary.is_file():
        pytest.fail(
            f"sim-engine binary not found at {engine_binary}: build the workspace's binaries "
            "(`cargo build --workspace --bins`) or point GARAGE_SIM_ENGINE_BIN at it.",
            pytrace=False,
        )
    work = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = work / "server.pem", work / "server.key"
    server.private_key_pem.write_to_path(str(key_file))
    # The chain: the leaf, then any intermediates (trustme makes none by default).
    with open(cert_file, "wb") as chain:
        for blob in server.cert_chain_pems:
            chain.write(blob.bytes())

    engine_port, gateway_port = _free_port(), _free_port()
    engine_log, log = work / "sim-engine.log", work / "gateway.log"
    _logs["tls_gateway"] = [log, engine_log]
    engine = _start(
        [
            str(engine_binary),
            "--listen", f"127.0.0.1:{engine_port}",
            "--model", TLS_MODEL,
            "--ssl-certfile", str(cert_file),
            "--ssl-keyfile", str(key_file),
        ],
        engine_log,
    )
    config = work / "gateway.toml"
    config.write_text(
        f"""listen = "127.0.0.1:{gateway_port}"
default_plugins = false
tls_cert_file = "{cert_file}"
tls_key_file = "{key_file}"

[auth]
admin_token = "{ADMIN_TOKEN}"

[dispatch]
tls_ca_file = "{ca_file}"

[[upstreams]]
name = "sim-tls"
base_url = "https://127.0.0.1:{engine_port}/v1"
models = ["{TLS_MODEL}"]
health_path = "/health"
"""
    )
    gateway = _start([str(binary), "serve", "--config", str(config)], log)
    base_url = f"https://127.0.0.1:{gateway_port}"
    try:
        trust = ssl.create_default_context(cafile=str(ca_file))
        _wait_until_up(gateway, base_url, log, verify=trust)
        with httpx.Client(verify=trust, timeout=10.0) as http:
            created = http.post(
                f"{base_url}/admin/keys",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                json={"name": "pytest-tls"},
            )
        assert created.status_code == 201, created.text
        yield TlsGateway(base_url=base_url, ca_file=ca_file, api_key=created.json()["key"])
    finally:
        try:
            _stop(gateway, "the TLS gateway", log)
        finally:
            _stop(engine, "the TLS sim-engine", engine_log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for fixture in item.fixturenames:
        for log in _logs.get(fixture, []):
            report.sections.append(
                (f"{log.name}, last {LOG_TAIL_LINES} lines ({log})", _log_tail(log))
            )
