"""Compatibility of the gateway's Anthropic Messages API with the official `anthropic` Python SDK.

Coding agents speak Anthropic's Messages API. Every test talks to the real `gateway demo` (see
conftest.py, rigs with simulated engines behind tunnels) through `anthropic.Anthropic`, the way
an agent would: `x-api-key`, `anthropic-version`, the SDK's own streaming and error classes. Plain
httpx is used only for the admin API (keys, the ledger).
"""

from __future__ import annotations

import time

import anthropic
import httpx
import pytest

from conftest import ADMIN_TOKEN, API_KEY, CHAT_MODELS

MODEL = CHAT_MODELS[0]
SYSTEM = "Be brief."
MESSAGES = [{"role": "user", "content": "Say hello to the garage."}]
LEDGER_TIMEOUT_S = 20.0


def make_client(base_url: str, api_key: str) -> anthropic.Anthropic:
    # No retries: a failure must show as itself, not be papered over by the SDK retrying it.
    return anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=30.0)


@pytest.fixture
def client(gateway_url: str):
    sdk = make_client(gateway_url, API_KEY)
    yield sdk
    sdk.close()


@pytest.fixture
def admin(gateway_url: str):
    with httpx.Client(
        base_url=gateway_url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30.0,
    ) as http:
        yield http


def ledger_entry(admin: httpx.Client, request_id: str) -> dict:
    """A request's entry in the usage ledger, once the usage worker has written it."""
    deadline = time.monotonic() + LEDGER_TIMEOUT_S
    while True:
        response = admin.get(f"/admin/usage/requests/{request_id}")
        if response.status_code == 200 and response.json().get("outcome") is not None:
            return response.json()
        assert time.monotonic() < deadline, f"no ledger entry for {request_id}: {response.text}"
        time.sleep(0.05)


def test_messages_create(client: anthropic.Anthropic, admin: httpx.Client):
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=16, system=SYSTEM, messages=MESSAGES
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0
    assert 0 < message.usage.output_tokens <= 16
    # The SDK reads Anthropic's `request-id` header; the gateway's ledger is keyed by it.
    assert message._request_id == raw.headers["x-request-id"]

    entry = ledger_entry(admin, raw.headers["x-request-id"])
    event = entry["event"]
    assert event["model"] == MODEL
    # The demo's gateway counts the simulated models' tokens itself: an honest rig agrees.
    assert event["counted"]["by"] == "gateway"
    assert (event["prompt_tokens"], event["completion_tokens"]) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    assert entry["outcome"]["credits"] > 0


def test_messages_stop_sequences_and_content_blocks(client: anthropic.Anthropic):
    # The simulated model speaks a script ("the quick brown fox ..."), whatever the prompt.
    message = client.messages.create(
        model=MODEL,
        max_tokens=32,
        system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}],
        stop_sequences=["fox"],
    )
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "fox"
    assert "fox" not in message.content[0].text


def test_messages_stream(client: anthropic.Anthropic):
    with client.messages.stream(
        model=MODEL, max_tokens=12, system=SYSTEM, messages=MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip()
    assert final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > 0
    assert 0 < final.usage.output_tokens <= 12


def test_messages_stream_events(client: anthropic.Anthropic):
    events = list(
        client.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in kinds
    start, delta = events[0], events[-2]
    assert start.message.usage.input_tokens > 0
    assert delta.usage.output_tokens == 5
    assert delta.delta.stop_reason == "max_tokens"


def test_count_tokens_matches_the_message(client: anthropic.Anthropic, admin: httpx.Client):
    raw = client.messages.with_raw_response.count_tokens(
        model=MODEL, system=SYSTEM, messages=MESSAGES
    )
    counted = raw.parse()
    message = client.messages.create(
        model=MODEL, max_tokens=4, system=SYSTEM, messages=MESSAGES
    )
    assert counted.input_tokens == message.usage.input_tokens
    # Recorded, not charged: counting generates nothing.
    entry = ledger_entry(admin, raw.headers["x-request-id"])
    assert (entry["event"]["prompt_tokens"], entry["event"]["completion_tokens"]) == (0, 0)
    assert entry["outcome"]["credits"] == 0


def test_async_client_streams(gateway_url: str):
    import asyncio

    async def run() -> str:
        async with anthropic.AsyncAnthropic(
            base_url=gateway_url, api_key=API_KEY, max_retries=0
        ) as sdk:
            async with sdk.messages.stream(
                model=MODEL, max_tokens=6, messages=MESSAGES
            ) as stream:
                return "".join([text async for text in stream.text_stream])

    assert asyncio.run(run()).strip()


# --- errors, as the SDK's typed exceptions -------------------------------------------------------


def error_type(err: anthropic.APIStatusError) -> str:
    assert isinstance(err.body, dict) and err.body["type"] == "error", err.body
    return err.body["error"]["type"]


def test_a_bad_key_is_an_authentication_error(gateway_url: str):
    bad = make_client(gateway_url, "sk-garage-not-a-real-key")
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
    assert caught.value.status_code == 401
    assert error_type(caught.value) == "authentication_error"
    # The secret is not echoed back whole.
    assert "sk-garage-not-a-real-key" not in caught.value.message
    assert caught.value.request_id
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.count_tokens(model=MODEL, messages=MESSAGES)


def test_a_bad_request_is_a_bad_request_error(client: anthropic.Anthropic):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=0, messages=MESSAGES)
    assert error_type(caught.value) == "invalid_request_error"
    assert "max_tokens" in caught.value.message
    # A rig's own refusal, in Anthropic's shape too.
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "robot", "content": "hi"}]
        )
    assert error_type(caught.value) == "invalid_request_error"


def test_an_unknown_model_is_not_found(client: anthropic.Anthropic):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-not-served-here", max_tokens=4, messages=MESSAGES)
    assert error_type(caught.value) == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-not-served-here", messages=MESSAGES)


def test_a_model_the_key_may_not_use_is_permission_denied(
    gateway_url: str, admin: httpx.Client
):
    created = admin.post(
        "/admin/keys", json={"name": "pytest-anthropic-restricted", "allowed_models": [CHAT_MODELS[1]]}
    )
    assert created.status_code == 201, created.text
    restricted = make_client(gateway_url, created.json()["key"])
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        restricted.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
    assert error_type(caught.value) == "permission_error"
    # The model it may use answers.
    message = restricted.messages.create(model=CHAT_MODELS[1], max_tokens=4, messages=MESSAGES)
    assert message.content[0].text
    admin.delete(f"/admin/keys/{created.json()['id']}")
