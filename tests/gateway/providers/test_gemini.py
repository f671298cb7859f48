"""The Gemini adapter against a fake Generative Language API: exact requests, translation back."""

import pytest

from apps.gateway.providers import ProviderError, Target, adapter_for
from apps.gateway.providers.base import Usage

adapter = adapter_for("gemini")


def target(server, model="gemini-test", **options):
    return Target(kind="gemini", api_base=server.base_url, upstream_model=model, secret="g-secret",
                  options=options)


BODY = {
    "model": "gemini-test",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
                 {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "again"}],
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 64,
    "stop": ["END"],
    "response_format": {"type": "json_object"},
}


async def test_request_maps_roles_system_and_generation_config(gemini_upstream):
    await adapter.complete(target(gemini_upstream), BODY)

    sent = gemini_upstream.requests[-1]
    assert sent["path"] == "/v1beta/models/gemini-test:generateContent"
    assert sent["headers"]["x-goog-api-key"] == "g-secret"
    assert "key" not in sent["query"]
    assert sent["body"] == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [{"role": "user", "parts": [{"text": "hello there"}]},
                     {"role": "model", "parts": [{"text": "Hi."}]},
                     {"role": "user", "parts": [{"text": "again"}]}],
        "generationConfig": {"temperature": 0.5, "topP": 0.9, "maxOutputTokens": 64, "stopSequences": ["END"],
                             "responseMimeType": "application/json"},
    }


async def test_response_and_usage_metadata_translate(gemini_upstream):
    completion = await adapter.complete(target(gemini_upstream), BODY)

    body = completion.body
    assert body["object"] == "chat.completion"
    assert body["model"] == "gemini-test"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Echo: again"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert completion.usage == Usage(prompt_tokens=2 + 1 + 1 + 2, completion_tokens=2)
    assert body["usage"]["total_tokens"] == 8


async def test_tool_calls_and_results(gemini_upstream):
    body = {
        "model": "x",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    completion = await adapter.complete(target(gemini_upstream, model="tool-model"), body)

    sent = gemini_upstream.requests[-1]["body"]
    assert sent["contents"][1] == {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                                                                                "args": {"city": "Paris"}}}]}
    assert sent["contents"][2] == {"role": "user", "parts": [{"functionResponse": {
        "name": "get_weather", "response": {"sky": "sunny"}}}]}
    assert sent["tools"] == [{"functionDeclarations": [{"name": "get_weather", "description": "",
                                                        "parameters": {"type": "object"}}]}]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}


async def test_stream_uses_alt_sse_and_ends_with_usage(gemini_upstream):
    chunks = [c async for c in adapter.stream(target(gemini_upstream), BODY)]

    sent = gemini_upstream.requests[-1]
    assert sent["path"] == "/v1beta/models/gemini-test:streamGenerateContent"
    assert sent["query"] == {"alt": "sse"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Echo: again"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 2


async def test_stream_broken_midway_raises(gemini_upstream):
    body = {**BODY, "messages": [{"role": "user", "content": "one two three four five six"}]}
    received = []

    async def drain():
        async for c in adapter.stream(target(gemini_upstream, model="break-1"), body):
            received.append(c)

    with pytest.raises(ProviderError) as exc:
        await drain()

    assert received
    assert exc.value.code == "upstream_stream_broken"
    assert not exc.value.retryable


@pytest.mark.parametrize(("status", "retryable", "ours"), [(503, True, 502), (429, True, 429), (400, False, 400)])
async def test_error_bodies(gemini_upstream, status, retryable, ours):
    with pytest.raises(ProviderError) as exc:
        await adapter.complete(target(gemini_upstream, model=f"fail-{status}"), BODY)

    assert (exc.value.retryable, exc.value.status) == (retryable, ours)
    assert f"fake gemini error {status}" in exc.value.message


async def test_embeddings_use_batch_embed_contents(gemini_upstream):
    completion = await adapter.embed(target(gemini_upstream, model="text-embedding-004"),
                                     {"model": "x", "input": ["a b", "c"], "dimensions": 4})

    sent = gemini_upstream.requests[-1]
    assert sent["path"] == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert sent["body"] == {"requests": [
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "a b"}]}, "outputDimensionality": 4},
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": "c"}]}, "outputDimensionality": 4},
    ]}
    assert [d["embedding"] for d in completion.body["data"]] == [[0.5] * 4, [0.5] * 4]
    assert completion.usage.estimated
