"""`gateway health`, the gateway image's health check (deploy/docker/gateway.Dockerfile has no
curl): the real binary against the real gateway of the session, and against addresses that do
not answer as a live gateway does."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from urllib.parse import urlparse

from conftest import _free_port, _gateway_binary


def health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GARAGE_")}
    return subprocess.run(
        [str(_gateway_binary()), "health", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
    )


def test_a_live_gateway_is_healthy(gateway_url: str) -> None:
    done = health("--url", f"{gateway_url}/health")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"healthy: {gateway_url}/health"


def test_the_address_comes_from_garage_listen_as_in_the_image(gateway_url: str) -> None:
    port = urlparse(gateway_url).port
    # The image sets GARAGE_LISTEN=0.0.0.0:8080: an unspecified address is asked on loopback.
    done = health(env={"GARAGE_LISTEN": f"0.0.0.0:{port}"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"healthy: http://127.0.0.1:{port}/health"


def test_nothing_listening_is_unhealthy() -> None:
    port = _free_port()
    done = health("--listen", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"unhealthy: no answer from http://127.0.0.1:{port}/health" in done.stderr


def test_an_error_status_is_unhealthy(gateway_url: str) -> None:
    done = health("--url", f"{gateway_url}/no-such-path")
    assert done.returncode == 1
    assert "answered 404" in done.stderr


def test_a_peer_that_never_answers_is_unhealthy_within_the_checks_deadline() -> None:
    """Accepts the connection and says nothing: the check gives up on its own (5 s) instead of
    waiting for Docker's --timeout to kill it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        accepted: list[socket.socket] = []
        stop = threading.Event()

        def hold() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                try:
                    accepted.append(server.accept()[0])
                except OSError:
                    continue

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        try:
            done = health("--listen", f"127.0.0.1:{server.getsockname()[1]}")
        finally:
            stop.set()
            holder.join()
            for conn in accepted:
                conn.close()
    assert done.returncode == 1
    assert "unhealthy: no answer from" in done.stderr


def test_a_bad_listen_address_is_a_clear_error() -> None:
    done = health(env={"GARAGE_LISTEN": "not-an-address"})
    assert done.returncode == 2
    assert "not-an-address" in done.stderr
