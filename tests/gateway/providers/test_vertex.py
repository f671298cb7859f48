"""The Vertex AI adapter against a fake Vertex with its own OAuth token endpoint: the service
account's signed JWT exchanged for a token, the exact requests for Gemini and Claude models,
streams and errors."""

import orjson
import pytest

from apps.gateway.providers import ProviderError, Target, adapter_for
from apps.gateway.providers import vertex as vertex_module
from tests.fakes import vertex_server as fake

adapter = adapter_for("vertex")
BODY = {"model": "x", "max_tokens": 64, "temperature": 0.2,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]}


def target(server, model="gemini-2.0-flash", *, region="europe-west4", **options):
    return Target(kind="vertex", api_base=server.base_url, upstream_model=model,
                  secret=orjson.dumps(server.service_account_info()).decode(), options=options, region=region)


async def test_gemini_request_with_a_service_account_token(vertex_upstream):
    completion = await adapter.complete(target(vertex_upstream), BODY)

    sent = vertex_upstream.requests[-1]
    assert sent["path"] == (f"/v1/projects/{fake.PROJECT}/locations/europe-west4/publishers/google/models/"
                            "gemini-2.0-flash:generateContent")
    assert sent["headers"]["Authorization"] in {f"Bearer {t}" for t in vertex_upstream.tokens}
    assert "x-goog-api-key" not in {k.lower() for k in sent["headers"]}
    assert sent["body"]["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent["body"]["generationConfig"] == {"temperature": 0.2, "maxOutputTokens": 64}
    assert completion.body["choices"][0]["message"]["content"] == "Echo: hello there"
    assert completion.usage.completion_tokens == 3


async def test_the_token_is_reused_until_it_expires(vertex_upstream):
    before = vertex_upstream.token_requests

    await adapter.complete(target(vertex_upstream), BODY)
    await adapter.complete(target(vertex_upstream), BODY)

    assert vertex_upstream.token_requests == before + 1


async def test_claude_on_vertex_uses_raw_predict_with_the_vertex_version(vertex_upstream):
    completion = await adapter.complete(target(vertex_upstream, model="claude-3-5-haiku@20241022",
                                               project="other-project", region=""), BODY)

    sent = vertex_upstream.requests[-1]
    assert sent["path"] == ("/v1/projects/other-project/locations/us-central1/publishers/anthropic/models/"
                            "claude-3-5-haiku@20241022:rawPredict")
    assert sent["body"] == {"anthropic_version": "vertex-2023-10-16", "max_tokens": 64, "system": "Be brief.",
                            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
                            "temperature": 0.2}
    assert completion.body["choices"][0]["message"]["content"] == "Echo: hello there"


@pytest.mark.parametrize("model", ["gemini-2.0-flash", "claude-3-5-haiku@20241022"])
async def test_streams(vertex_upstream, model):
    chunks = [c async for c in adapter.stream(target(vertex_upstream, model=model), BODY)]

    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Echo: hello there"
    assert chunks[-1]["_gateway_usage"].completion_tokens == 3
    method = "streamGenerateContent" if model.startswith("gemini") else "streamRawPredict"
    assert vertex_upstream.requests[-1]["path"].endswith(f":{method}")


async def test_claude_native_messages_body_keeps_thinking(vertex_upstream):
    native = {"model": "ignored", "max_tokens": 64, "thinking": {"type": "enabled", "budget_tokens": 32},
              "messages": [{"role": "user", "content": "hi"}]}

    completion = await adapter.complete_native(target(vertex_upstream, model="claude-sonnet-4@20250514"), native)

    sent = vertex_upstream.requests[-1]["body"]
    assert "model" not in sent and sent["thinking"] == {"type": "enabled", "budget_tokens": 32}
    assert completion.native["content"][0]["text"] == "Echo: hi"
    assert adapter.takes_native(target(vertex_upstream, model="claude-x")) == "messages"
    assert adapter.takes_native(target(vertex_upstream)) == ""


async def test_upstream_errors_map_to_provider_errors(vertex_upstream):
    with pytest.raises(ProviderError) as err:
        await adapter.complete(target(vertex_upstream, model="fail-429"), BODY)

    assert (err.value.status, err.value.retryable) == (429, True)


async def test_a_bad_service_account_fails_authentication(vertex_upstream):
    info = {**vertex_upstream.service_account_info(), "client_email": "someone@else.iam.gserviceaccount.com"}
    bad = Target(kind="vertex", api_base=vertex_upstream.base_url, upstream_model="gemini-2.0-flash",
                 secret=orjson.dumps(info).decode(), options={})

    with pytest.raises(ProviderError) as err:
        await adapter.complete(bad, BODY)

    assert err.value.code == "upstream_auth_failed"
    assert "PRIVATE KEY" not in err.value.message


def test_endpoint_from_location():
    t = Target(kind="vertex", api_base="", upstream_model="gemini-2.0-flash", options={"project": "p"},
               region="europe-west1")

    assert vertex_module.model_url(t, "generateContent") == (
        "https://europe-west1-aiplatform.googleapis.com/v1/projects/p/locations/europe-west1/publishers/google/"
        "models/gemini-2.0-flash:generateContent")
    assert vertex_module.model_url(Target(kind="vertex", api_base="", upstream_model="m",
                                          options={"project": "p", "location": "global"}), "x").startswith(
        "https://aiplatform.googleapis.com/v1/projects/p/locations/global/")
