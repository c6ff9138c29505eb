"""Webhooks seen from a receiver written in Python: a `usage.recorded` delivery for a chat
request made with the `openai` SDK, checked with the very `verify` function docs/money.md
shows operators (taken from the page, so the example cannot drift from what the gateway sends).
"""

from __future__ import annotations

import http.server
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ADMIN_TOKEN, API_KEY, CHAT_MODELS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "money.md"
DELIVERY_TIMEOUT_S = 30.0


def docs_verify():
    """The `verify(secret, headers, body)` of docs/money.md's receiver example."""
    block = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert block, "docs/money.md has no Python example"
    namespace: dict = {}
    exec(block.group(1), namespace)  # noqa: S102 - our own documentation
    return namespace["verify"]


class Receiver:
    """An HTTP server on loopback that keeps every delivery (headers and body) and answers 204."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        received = self.deliveries

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, webhook_id: str) -> tuple[dict[str, str], bytes]:
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            for headers, body in list(self.deliveries):
                if headers.get("webhook-id") == webhook_id:
                    return headers, body
            time.sleep(0.05)
        pytest.fail(f"no delivery of {webhook_id} within {DELIVERY_TIMEOUT_S} s")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def test_a_usage_event_verifies_with_the_documented_receiver(gateway_url: str, receiver: Receiver):
    verify = docs_verify()
    with httpx.Client(
        base_url=gateway_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30.0
    ) as admin:
        created = admin.post(
            "/admin/webhooks", json={"url": receiver.url, "events": ["usage.recorded"]}
        )
        assert created.status_code == 201, created.text
        endpoint = created.json()
        try:
            sdk = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=API_KEY, max_retries=0)
            completion = sdk.chat.completions.create(
                model=CHAT_MODELS[0], messages=[{"role": "user", "content": "Bill me."}]
            )
            request_id = completion._request_id
            assert request_id

            headers, body = receiver.wait_for(request_id)
            assert headers["content-type"] == "application/cloudevents+json"
            assert verify(endpoint["secret"], headers, body)
            # What the receiver must refuse: a changed body, another secret, a replay later on.
            assert not verify(endpoint["secret"], headers, body.replace(b"usage", b"usagE"))
            assert not verify("whsec_" + "A" * 43 + "=", headers, body)
            stale = dict(headers, **{"webhook-timestamp": str(int(time.time()) - 600)})
            assert not verify(endpoint["secret"], stale, body)

            event = httpx.Response(200, content=body).json()
            assert event["specversion"] == "1.0"
            assert event["type"] == "dev.garage.usage.recorded"
            assert event["id"] == request_id
            assert event["data"]["model"] == CHAT_MODELS[0]
            assert event["data"]["prompt_tokens"] == completion.usage.prompt_tokens
            assert event["data"]["completion_tokens"] == completion.usage.completion_tokens
        finally:
            deleted = admin.delete(f"/admin/webhooks/{endpoint['id']}")
            assert deleted.status_code == 200, deleted.text
