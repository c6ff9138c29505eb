"""Starts the real gateway (`gateway demo`) once per session for the OpenAI SDK tests.

The binary is `$GARAGE_GATEWAY_BIN` if set, else `target/debug/gateway` under the repository
root (build it with `cargo build -p garage-gateway`). Its stdout and stderr go to a log file whose
path, and last lines, are shown with every failing test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
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

# Set once the gateway is started, so failure reports can show its log.
_gateway_log: Path | None = None


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


def _wait_until_up(proc: subprocess.Popen, base_url: str, log: Path) -> None:
    """Polls /health, then /ready, until both answer 200; bounded by STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = "no answer yet"
    with httpx.Client(timeout=2.0) as http:
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


@pytest.fixture(scope="session")
def gateway_url(tmp_path_factory: pytest.TempPathFactory):
    """Base URL (no /v1) of a `gateway demo` running for the whole session.

    Teardown sends SIGTERM and requires a clean exit (code 0) within SHUTDOWN_TIMEOUT_S:
    graceful shutdown is part of what these tests check.
    """
    global _gateway_log
    binary = _gateway_binary()
    port = _free_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    _gateway_log = log
    args = [
        str(binary),
        "demo",
        "--listen", f"127.0.0.1:{port}",
        "--api-key", API_KEY,
        "--admin-token", ADMIN_TOKEN,
        "--nodes", "2",
        "--ttft-ms", "0",
        "--tokens-per-sec", "0",
    ]
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("NO_COLOR", "1")
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, base_url, log)
        yield base_url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(
                    f"the gateway did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM.\n"
                    f"log ({log}):\n{_log_tail(log)}",
                    pytrace=False,
                )
        else:
            code = proc.returncode
        assert code == 0, (
            f"the gateway exited with code {code} after SIGTERM (graceful shutdown must exit 0).\n"
            f"log ({log}):\n{_log_tail(log)}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _gateway_log is not None:
        report.sections.append(
            (f"gateway log, last {LOG_TAIL_LINES} lines ({_gateway_log})", _log_tail(_gateway_log))
        )
