"""Compatibility of the gateway with the official `openai` Python SDK.

Every test talks to a real `gateway demo` (see conftest.py) through `openai.OpenAI`, the way a
user would; plain httpx is used only where the SDK cannot express the request (malformed bodies)
and for the admin API, which is not part of OpenAI's.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid

import httpx
import openai
import pytest

from conftest import ADMIN_TOKEN, API_KEY, CHAT_MODELS, DEMO_MODELS, EMBEDDING_MODEL

CHAT_MODEL = CHAT_MODELS[0]
MESSAGES = [{"role": "user", "content": "Say hello to the garage."}]
ERROR_FIELDS = {"message", "type", "param", "code"}


class ResponseLog:
    """Every HTTP response a client received, to check headers the SDK does not surface."""

    def __init__(self) -> None:
        self.responses: list[httpx.Response] = []

    def __call__(self, response: httpx.Response) -> None:
        self.responses.append(response)

    def without_request_id(self) -> list[str]:
        return [
            f"{r.request.method} {r.request.url.path} -> {r.status_code}"
            for r in self.responses
            if not r.headers.get("x-request-id")
        ]


def make_client(base_url: str, api_key: str, log: ResponseLog) -> openai.OpenAI:
    http_client = httpx.Client(timeout=30.0, event_hooks={"response": [log]})
    # No retries: a failure must show as itself, not be papered over by the SDK retrying it.
    return openai.OpenAI(
        base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, http_client=http_client
    )


@pytest.fixture
def responses() -> ResponseLog:
    return ResponseLog()


@pytest.fixture
def client(gateway_url: str, responses: ResponseLog):
    """An SDK client with the demo key. On teardown, checks that every response it received,
    errors and streams included, carried an `x-request-id` header."""
    sdk = make_client(gateway_url, API_KEY, responses)
    yield sdk
    sdk.close()
    missing = responses.without_request_id()
    assert not missing, f"responses without an x-request-id header: {missing}"


@pytest.fixture
def admin(gateway_url: str):
    with httpx.Client(
        base_url=gateway_url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30.0,
    ) as http:
        yield http


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    return body["error"]


# --- chat completions ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_chat_completion(client: openai.OpenAI, model: str):
    completion = client.chat.completions.create(model=model, messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.model == model
    assert completion.id
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    # The SDK exposes the x-request-id header as `_request_id`.
    assert completion._request_id


def test_chat_completion_streamed_hides_the_usage_chunk(client: openai.OpenAI):
    """The gateway asks the backend for usage on every stream (to meter it) but must not show
    the extra usage chunk to a client that did not ask for it."""
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 3, chunks
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == CHAT_MODEL
        assert chunk.choices, f"chunk with no choices (the hidden usage chunk leaked?): {chunk}"
        assert chunk.usage is None, f"usage chunk the client did not ask for: {chunk}"
    assert len({chunk.id for chunk in chunks}) == 1
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert content.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_completion_streamed_with_usage(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len(chunks) >= 3, chunks
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens > 0
    assert last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    # Only the last chunk carries usage; the others carry the content.
    assert all(chunk.usage is None and chunk.choices for chunk in chunks[:-1])
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert content.strip()


def _price(headers: httpx.Headers) -> tuple[float, float]:
    """`x-garage-price: prompt=P, completion=C`: credits per 1,000 tokens, quoted at admission."""
    parts = dict(part.strip().split("=") for part in headers["x-garage-price"].split(","))
    return float(parts["prompt"]), float(parts["completion"])


def test_usage_says_what_the_answer_cost(client: openai.OpenAI):
    """The usage of an answer carries its cost in credits (an extra field the SDK keeps), the
    quoted price times its tokens, in the last chunk of a stream too."""
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=8
    )
    completion = raw.parse()
    prompt_price, completion_price = _price(raw.headers)
    usage = completion.usage
    cost = usage.model_extra["cost"]
    expected = (usage.prompt_tokens * prompt_price + usage.completion_tokens * completion_price) / 1000
    assert cost == pytest.approx(expected, abs=1e-9)
    assert float(raw.headers["x-garage-cost"]) == cost

    with client.chat.completions.with_streaming_response.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        prompt_price, completion_price = _price(response.headers)
        chunks = list(response.parse())
    usage = chunks[-1].usage
    expected = (usage.prompt_tokens * prompt_price + usage.completion_tokens * completion_price) / 1000
    assert usage.model_extra["cost"] == pytest.approx(expected, abs=1e-9)
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_chat_stream_helper(client: openai.OpenAI):
    """The SDK's higher-level streaming helper, which accumulates the final completion."""
    with client.chat.completions.stream(model=CHAT_MODEL, messages=MESSAGES) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert deltas
    assert final.choices[0].message.content
    assert final.choices[0].message.content == "".join(deltas)


def test_chat_completion_accepts_extra_fields(client: openai.OpenAI):
    """Fields the gateway does not know (vendor extensions, tools, sampling knobs) pass through."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    completion = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        tools=tools,
        tool_choice="auto",
        temperature=0.2,
        top_p=0.9,
        max_tokens=64,
        seed=7,
        user="pytest",
        extra_body={"vendor_x": 1, "nested_vendor": {"a": [1, 2, 3]}},
    )
    assert completion.choices
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        tools=tools,
        stream=True,
        extra_body={"vendor_x": 1},
    )
    chunks = list(stream)
    assert chunks and all(chunk.choices for chunk in chunks)


def test_chat_raw_response_has_request_id(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    assert raw.status_code == 200
    request_id = raw.headers.get("x-request-id")
    assert request_id
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion._request_id == request_id


def test_streamed_raw_response_has_request_id(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True
    )
    assert raw.headers.get("x-request-id")
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert chunks


def test_client_request_id_is_echoed_beside_the_gateways_own(client: openai.OpenAI):
    """The caller's correlation id comes back in x-client-request-id; x-request-id is always
    the gateway's own (it keys the usage ledger), even when the caller sent one."""
    mine = f"pytest-{uuid.uuid4()}"
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        extra_headers={"x-client-request-id": mine, "x-request-id": mine},
    )
    assert raw.headers.get("x-client-request-id") == mine
    request_id = raw.headers.get("x-request-id")
    assert request_id and request_id != mine
    assert uuid.UUID(request_id).version == 7


def test_async_client_streams(gateway_url: str):
    async def run() -> str:
        async with openai.AsyncOpenAI(
            base_url=f"{gateway_url}/v1", api_key=API_KEY, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model=CHAT_MODEL, messages=MESSAGES, stream=True
            )
            parts = []
            async for chunk in stream:
                assert chunk.choices and chunk.usage is None
                parts.append(chunk.choices[0].delta.content or "")
            return "".join(parts)

    assert asyncio.run(run()).strip()


# --- legacy completions -------------------------------------------------------------------------


def test_completion(client: openai.OpenAI):
    completion = client.completions.create(model=CHAT_MODEL, prompt="Once upon a time")
    assert completion.object == "text_completion"
    assert completion.model == CHAT_MODEL
    assert completion.choices[0].text.strip()
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0


def test_completion_streamed(client: openai.OpenAI):
    chunks = list(
        client.completions.create(model=CHAT_MODEL, prompt="Once upon a time", stream=True)
    )
    assert len(chunks) >= 3, chunks
    assert all(chunk.choices and chunk.usage is None for chunk in chunks), chunks
    assert "".join(chunk.choices[0].text for chunk in chunks).strip()


def test_completion_streamed_with_usage(client: openai.OpenAI):
    chunks = list(
        client.completions.create(
            model=CHAT_MODEL,
            prompt="Once upon a time",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]).strip()


# --- embeddings ---------------------------------------------------------------------------------


def test_embeddings_default_encoding(client: openai.OpenAI):
    """The SDK asks for base64 when the caller gives no encoding_format, then decodes it."""
    inputs = ["first text", "second text", "third"]
    raw = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=inputs)
    wire = raw.http_response.json()
    assert all(isinstance(item["embedding"], str) for item in wire["data"]), (
        "the SDK asked for base64; the gateway should return base64 strings"
    )
    result = raw.parse()
    assert result.model == EMBEDDING_MODEL
    assert [item.index for item in result.data] == [0, 1, 2]
    lengths = {len(item.embedding) for item in result.data}
    assert len(lengths) == 1 and lengths.pop() > 0, lengths
    for item in result.data:
        assert all(isinstance(x, float) for x in item.embedding)
        assert any(x != 0.0 for x in item.embedding)
    assert result.usage.prompt_tokens > 0


def test_embeddings_float_matches_base64(client: openai.OpenAI):
    as_float = client.embeddings.create(
        model=EMBEDDING_MODEL, input="same text", encoding_format="float"
    )
    as_base64 = client.embeddings.create(
        model=EMBEDDING_MODEL, input="same text", encoding_format="base64"
    )
    floats = as_float.data[0].embedding
    encoded = as_base64.data[0].embedding
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded)
    decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert len(decoded) == len(floats) > 0
    assert decoded == pytest.approx(floats, rel=1e-6, abs=1e-6)


# --- models -------------------------------------------------------------------------------------


def test_models_list(client: openai.OpenAI):
    models = list(client.models.list())
    ids = {model.id for model in models}
    assert set(DEMO_MODELS) <= ids, ids
    for model in models:
        assert model.object == "model"
        assert model.owned_by
        assert model.created > 0


@pytest.mark.parametrize("model_id", DEMO_MODELS)
def test_models_retrieve(client: openai.OpenAI, model_id: str):
    model = client.models.retrieve(model_id)
    assert model.id == model_id
    assert model.object == "model"


def test_models_retrieve_unknown(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


# --- errors -------------------------------------------------------------------------------------


def test_bad_key_is_authentication_error(gateway_url: str, responses: ResponseLog):
    bad = make_client(gateway_url, "sk-garage-not-a-real-key", responses)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    err = caught.value
    assert err.status_code == 401
    assert err.code == "invalid_api_key"
    assert err.type == "invalid_request_error"
    assert err.request_id
    # The secret is not echoed back whole.
    assert "sk-garage-not-a-real-key" not in err.message
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert not responses.without_request_id()


def test_missing_key_is_401(gateway_url: str):
    response = httpx.post(
        f"{gateway_url}/v1/chat/completions", json={"model": CHAT_MODEL, "messages": MESSAGES}
    )
    assert_openai_error(response, 401)


# --- responses -----------------------------------------------------------------------------------


def test_responses_create(client: openai.OpenAI):
    response = client.responses.create(
        model=CHAT_MODEL, input="Say hello to the garage.", instructions="Be brief."
    )
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.model == CHAT_MODEL
    assert response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert response.usage.total_tokens == (
        response.usage.input_tokens + response.usage.output_tokens
    )
    assert response._request_id


def test_responses_streamed(client: openai.OpenAI):
    """Typed events, as vLLM sends them; the usage in the last one, which the gateway reads
    and leaves in place."""
    events = list(client.responses.create(model=CHAT_MODEL, input=MESSAGES, stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created", types
    assert types[-1] == "response.completed", types
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas.strip()
    final = events[-1].response
    assert final.output_text == deltas
    assert final.usage is not None and final.usage.output_tokens > 0


def test_responses_stream_helper(client: openai.OpenAI):
    """The SDK's helper, which builds the response up from the events."""
    with client.responses.stream(model=CHAT_MODEL, input="Say hello.") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas
    assert final.output_text == "".join(deltas)
    assert final.usage is not None and final.usage.output_tokens == len(deltas)


def test_rerank_and_score(client: openai.OpenAI):
    """vLLM's scoring APIs are not in the SDK's types: sent through its generic post, as users
    of rerankers with the openai client do."""
    ranked = client.post(
        "/rerank",
        body={
            "model": EMBEDDING_MODEL,
            "query": "garage rigs",
            "documents": ["a bowl of soup", "rigs in a garage", "the garage"],
        },
        cast_to=object,
    )
    assert [result["index"] for result in ranked["results"]] == [1, 2, 0]
    assert ranked["usage"]["prompt_tokens"] > 0
    scored = client.post(
        "/score",
        body={"model": EMBEDDING_MODEL, "text_1": "garage rigs", "text_2": ["garage rigs", "soup"]},
        cast_to=object,
    )
    assert [item["score"] for item in scored["data"]] == [1.0, 0.0]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.chat.completions.create(model="no-such-model", messages=MESSAGES),
        lambda c: c.chat.completions.create(model="no-such-model", messages=MESSAGES, stream=True),
        lambda c: c.completions.create(model="no-such-model", prompt="hi"),
        lambda c: c.embeddings.create(model="no-such-model", input="hi"),
        lambda c: c.responses.create(model="no-such-model", input="hi"),
        lambda c: c.responses.create(model="no-such-model", input="hi", stream=True),
    ],
    ids=["chat", "chat-stream", "completions", "embeddings", "responses", "responses-stream"],
)
def test_unknown_model_is_not_found(client: openai.OpenAI, call):
    with pytest.raises(openai.NotFoundError) as caught:
        call(client)
    err = caught.value
    assert err.status_code == 404
    assert err.code == "model_not_found"
    assert err.param == "model"
    assert "no-such-model" in err.message


def test_missing_messages_is_bad_request(client: openai.OpenAI):
    """The SDK's types forbid this request, so send it through the client's generic post."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body={"model": CHAT_MODEL}, cast_to=httpx.Response)
    err = caught.value
    assert err.status_code == 400
    assert err.param == "messages"
    assert err.type == "invalid_request_error"
    assert err.request_id
    # The SDK hands over the inner `error` object as `body`.
    assert isinstance(err.body, dict) and set(err.body) == ERROR_FIELDS, err.body


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": CHAT_MODEL}, "messages"),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": None}, "messages"),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": MESSAGES}, "model"),
        ("/v1/completions", {"model": CHAT_MODEL}, "prompt"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL}, "input"),
        ("/v1/responses", {"model": CHAT_MODEL}, "input"),
        ("/v1/responses", {"model": CHAT_MODEL, "input": 5}, "input"),
    ],
)
def test_malformed_requests_get_openai_errors(gateway_url: str, path: str, body: dict, param: str):
    response = httpx.post(
        gateway_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unparseable_json_is_bad_request(gateway_url: str):
    response = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"


def test_unknown_route_is_openai_shaped_404(gateway_url: str):
    response = httpx.get(
        f"{gateway_url}/v1/no-such-route", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert_openai_error(response, 404)


# --- admin API: key lifecycle seen from the SDK ------------------------------------------------


def test_admin_requires_admin_token(gateway_url: str):
    assert_openai_error(httpx.get(f"{gateway_url}/admin/keys"), 401)
    # An API key is not an admin token.
    response = httpx.get(
        f"{gateway_url}/admin/keys", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert_openai_error(response, 401)


def test_admin_key_lifecycle(gateway_url: str, admin: httpx.Client, responses: ResponseLog):
    created = admin.post("/admin/keys", json={"name": "pytest-lifecycle"})
    assert created.status_code == 201, created.text
    assert created.headers.get("x-request-id")
    record = created.json()
    key, key_id = record["key"], record["id"]
    assert key.startswith("sk-garage-")
    assert record["name"] == "pytest-lifecycle"
    assert record["revoked_at"] is None
    assert key.startswith(record["prefix"])

    # The secret is shown once: never again in listings.
    listed = admin.get("/admin/keys")
    assert listed.status_code == 200
    assert key_id in {k["id"] for k in listed.json()["data"]}
    assert key not in listed.text

    sdk = make_client(gateway_url, key, responses)
    completion = sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content
    assert {m.id for m in sdk.models.list()} >= set(DEMO_MODELS)

    revoked = admin.delete(f"/admin/keys/{key_id}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    assert admin.get(f"/admin/keys/{key_id}").json()["revoked_at"] is not None

    # Revocation reaches every replica within a second (documented); poll a little past that.
    deadline = time.monotonic() + 2.0
    while True:
        try:
            sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
        except openai.PermissionDeniedError as err:
            assert err.status_code == 403
            assert err.code == "api_key_revoked"
            assert err.type == "permission_error"
            break
        if time.monotonic() > deadline:
            pytest.fail("a revoked key still works 2 s after DELETE /admin/keys/{id}")
        time.sleep(0.05)
    with pytest.raises(openai.PermissionDeniedError):
        sdk.models.list()
    sdk.close()
    assert not responses.without_request_id(), responses.without_request_id()

    # The demo key is untouched.
    assert admin.get("/admin/keys").status_code == 200


def test_admin_unknown_key_is_404(admin: httpx.Client):
    assert_openai_error(admin.delete("/admin/keys/key_does_not_exist"), 404)
    assert_openai_error(admin.get("/admin/keys/key_does_not_exist"), 404)


def test_admin_create_key_rejects_bad_body(admin: httpx.Client):
    error = assert_openai_error(admin.post("/admin/keys", json={"name": "  "}), 400)
    assert error["param"] == "name"
    assert_openai_error(admin.post("/admin/keys", json={"nom": "typo"}), 400)


def test_key_restricted_to_models(gateway_url: str, admin: httpx.Client, responses: ResponseLog):
    created = admin.post(
        "/admin/keys", json={"name": "pytest-restricted", "allowed_models": [CHAT_MODELS[1]]}
    )
    assert created.status_code == 201, created.text
    sdk = make_client(gateway_url, created.json()["key"], responses)
    try:
        assert sdk.chat.completions.create(model=CHAT_MODELS[1], messages=MESSAGES).choices
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.chat.completions.create(model=CHAT_MODELS[0], messages=MESSAGES)
        assert caught.value.code == "model_not_allowed"
        assert {m.id for m in sdk.models.list()} == {CHAT_MODELS[1]}
    finally:
        sdk.close()
        admin.delete(f"/admin/keys/{created.json()['id']}")


# --- batch API (files and batches, run by the demo's rigs) -----------------------------------------


def _batch_lines(n: int, endpoint: str = "/v1/chat/completions") -> bytes:
    import json

    lines = []
    for i in range(n):
        if endpoint == "/v1/embeddings":
            body = {"model": EMBEDDING_MODEL, "input": f"text number {i}"}
        elif endpoint == "/v1/responses":
            body = {"model": CHAT_MODEL, "input": f"prompt number {i}", "max_output_tokens": 5}
        elif endpoint == "/v1/rerank":
            body = {
                "model": EMBEDDING_MODEL,
                "query": f"number {i}",
                "documents": ["number 0", f"number {i}", "something else"],
            }
        else:
            body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 5}
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": endpoint, "body": body}))
    return ("\n".join(lines) + "\n").encode()


def _wait_for_batch(client: openai.OpenAI, batch_id: str, bound_s: float = 60.0):
    deadline = time.monotonic() + bound_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        if time.monotonic() > deadline:
            pytest.fail(f"batch {batch_id} still {batch.status} after {bound_s:.0f} s: {batch}")
        time.sleep(0.1)


def test_batch_end_to_end(client: openai.OpenAI):
    import json

    uploaded = client.files.create(file=("requests.jsonl", _batch_lines(25)), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch"
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "pytest"},
    )
    assert batch.object == "batch"
    assert batch.status in ("validating", "in_progress")
    assert batch.request_counts.total == 25

    done = _wait_for_batch(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (25, 0)
    assert done.metadata == {"suite": "pytest"}
    assert done.error_file_id is None

    output = client.files.content(done.output_file_id).text
    lines = [json.loads(line) for line in output.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(25)]
    for line in lines:
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["message"]["content"]
        assert line["error"] is None

    # The SDK's auto-pagination walks the list with `after`.
    second = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    ids = [b.id for b in client.batches.list(limit=1)]
    assert ids.index(second.id) < ids.index(batch.id)
    _wait_for_batch(client, second.id)

    # Finished batches cannot be cancelled.
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_batch_of_embeddings(client: openai.OpenAI):
    import json

    uploaded = client.files.create(
        file=("embed.jsonl", _batch_lines(5, "/v1/embeddings")), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = _wait_for_batch(client, batch.id)
    assert done.request_counts.completed == 5, done
    for line in client.files.content(done.output_file_id).text.splitlines():
        assert json.loads(line)["response"]["body"]["data"][0]["embedding"]


def test_batch_of_responses(client: openai.OpenAI):
    import json

    uploaded = client.files.create(
        file=("responses.jsonl", _batch_lines(4, "/v1/responses")), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h"
    )
    done = _wait_for_batch(client, batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0), done
    for line in client.files.content(done.output_file_id).text.splitlines():
        body = json.loads(line)["response"]["body"]
        assert body["object"] == "response"
        assert body["output"][0]["content"][0]["text"]
    # The batch's usage adds up the Responses API's input_tokens and output_tokens.
    assert done.usage is not None
    assert done.usage.output_tokens == 4 * 5
    assert done.usage.input_tokens > 0


def test_batch_of_reranks(client: openai.OpenAI):
    """vLLM's batch runner takes rerank lines too: ranking a corpus needs no answer now."""
    import json

    uploaded = client.files.create(
        file=("rerank.jsonl", _batch_lines(3, "/v1/rerank")), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/rerank",  # type: ignore[arg-type]  (not an OpenAI endpoint)
        completion_window="24h",
    )
    done = _wait_for_batch(client, batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0), done
    for line in client.files.content(done.output_file_id).text.splitlines():
        line = json.loads(line)
        wanted = int(line["custom_id"].split("-")[1])
        best = line["response"]["body"]["results"][0]["index"]
        # Line 0 asks for "number 0", which documents 0 and 1 both are: the first wins ties.
        assert best == (0 if wanted == 0 else 1), line
    assert done.usage is not None and done.usage.input_tokens > 0


def test_batch_with_bad_lines_fails_with_line_errors(client: openai.OpenAI):
    content = _batch_lines(2) + b"{oops\n" + _batch_lines(1)  # the third line, and a repeated id
    uploaded = client.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = client.batches.retrieve(batch.id)
    assert failed.status == "failed"
    errors = [(e.line, e.code) for e in failed.errors.data]
    assert errors == [(3, "invalid_json_line"), (4, "duplicate_custom_id")]
    assert all(e.message for e in failed.errors.data)


def test_batch_bad_requests_are_openai_errors(client: openai.OpenAI):
    uploaded = client.files.create(file=("ok.jsonl", _batch_lines(1)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
        )
    assert err.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert err.value.param == "purpose"


def test_batches_and_files_belong_to_their_key(
    client: openai.OpenAI, gateway_url: str, admin: httpx.Client, responses: ResponseLog
):
    uploaded = client.files.create(file=("mine.jsonl", _batch_lines(2)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    created = admin.post("/admin/keys", json={"name": "pytest-batch-other"})
    assert created.status_code == 201, created.text
    other = make_client(gateway_url, created.json()["key"], responses)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(uploaded.id)
    assert batch.id not in [b.id for b in other.batches.list()]
    other.close()
    _wait_for_batch(client, batch.id)
