"""The official `openai` SDK against a gateway serving HTTPS (`tls_cert_file`), whose upstream
serves HTTPS too (a simulated vLLM engine started with `--ssl-certfile`, trusted through
`dispatch.tls_ca_file`); see the `tls_gateway` fixture in conftest.py. The SDK trusts the test
CA the way an application with a private CA does: an httpx client with `verify=` that CA.
"""

from __future__ import annotations

import ssl

import httpx
import openai
import pytest

from conftest import TLS_MODEL, TlsGateway

MESSAGES = [{"role": "user", "content": "Say hello over TLS."}]


@pytest.fixture
def tls_client(tls_gateway: TlsGateway):
    trust = ssl.create_default_context(cafile=str(tls_gateway.ca_file))
    http_client = httpx.Client(verify=trust, timeout=30.0)
    sdk = openai.OpenAI(
        base_url=f"{tls_gateway.base_url}/v1",
        api_key=tls_gateway.api_key,
        max_retries=0,
        http_client=http_client,
    )
    yield sdk
    sdk.close()


def test_chat_completion_over_tls(tls_client: openai.OpenAI):
    completion = tls_client.chat.completions.create(model=TLS_MODEL, messages=MESSAGES)
    assert completion.model == TLS_MODEL
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_chat_completion_streamed_over_tls(tls_client: openai.OpenAI):
    stream = tls_client.chat.completions.create(
        model=TLS_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # The usage chunk the client asked for comes last, with no choices.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_models_over_tls(tls_client: openai.OpenAI):
    assert [m.id for m in tls_client.models.list()] == [TLS_MODEL]
    # The SDK sends the slash in the name encoded (`/v1/models/garage-tests%2Fsim-tls-chat`).
    assert tls_client.models.retrieve(TLS_MODEL).id == TLS_MODEL
    with pytest.raises(openai.NotFoundError):
        tls_client.models.retrieve("garage-tests/not-served")


def test_embeddings_over_tls(tls_client: openai.OpenAI):
    embedding = tls_client.embeddings.create(model=TLS_MODEL, input=["one", "two"])
    assert len(embedding.data) == 2
    assert all(len(item.embedding) > 0 for item in embedding.data)


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_gateway: TlsGateway):
    # The system's roots only: the gateway's certificate comes from the test CA, so the SDK's
    # connection fails certificate verification, before any request is sent.
    sdk = openai.OpenAI(
        base_url=f"{tls_gateway.base_url}/v1",
        api_key=tls_gateway.api_key,
        max_retries=0,
        http_client=httpx.Client(timeout=10.0),
    )
    with sdk, pytest.raises(openai.APIConnectionError) as raised:
        sdk.models.list()
    cause = raised.value.__cause__
    assert isinstance(cause, httpx.ConnectError), repr(cause)
    assert "CERTIFICATE_VERIFY_FAILED" in str(cause), str(cause)


def test_plain_http_to_the_tls_port_gets_no_answer(tls_gateway: TlsGateway):
    plain = tls_gateway.base_url.replace("https://", "http://", 1)
    with httpx.Client(timeout=10.0) as http, pytest.raises(httpx.TransportError):
        http.get(f"{plain}/health")
