"""The Anthropic adapter against a fake Messages API: the exact request, and the translation back."""

import pytest

from apps.gateway.providers import ProviderError, Target, adapter_for
from apps.gateway.providers.base import Usage

adapter = adapter_for("anthropic")


def target(server, model="claude-test", **options):
    return Target(kind="anthropic", api_base=server.base_url, upstream_model=model, secret="sk-ant-secret",
                  options=options)


BODY = {
    "model": "claude-test",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "hello there"},
    ],
    "temperature": 0.2,
    "stop": "END",
    "user": "u-42",
}


async def test_request_lifts_system_sets_headers_and_default_max_tokens(anthropic_upstream):
    await adapter.complete(target(anthropic_upstream, default_max_tokens=321, beta=["prompt-caching-2024-07-31"]),
                           BODY)

    sent = anthropic_upstream.requests[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == "sk-ant-secret"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert "Authorization" not in sent["headers"]
    assert sent["body"] == {
        "model": "claude-test",
        "max_tokens": 321,
        "system": "Be brief.\n\nAnswer in English.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        "temperature": 0.2,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-42"},
    }


async def test_response_translates_to_chat_completion(anthropic_upstream):
    completion = await adapter.complete(target(anthropic_upstream), {**BODY, "max_tokens": 50})

    assert anthropic_upstream.requests[-1]["body"]["max_tokens"] == 50
    body = completion.body
    assert body["object"] == "chat.completion"
    assert body["id"] == "msg_fake01"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Echo: hello there"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert completion.usage.completion_tokens == 3
    assert body["usage"]["total_tokens"] == completion.usage.prompt_tokens + 3


async def test_cache_tokens_are_counted_into_prompt_and_reported_apart(anthropic_upstream):
    completion = await adapter.complete(target(anthropic_upstream, model="cache-model"), BODY)

    sent = anthropic_upstream.requests[-1]["body"]
    plain = sum(len(str(m["content"]).split()) for m in sent["messages"]) + 3
    assert completion.usage == Usage(prompt_tokens=plain + 11 + 7, completion_tokens=3, cached_tokens=11,
                                     cache_write_tokens=7)
    assert Usage.from_openai(completion.body["usage"]) == completion.usage


async def test_tools_and_tool_results_round_trip(anthropic_upstream):
    body = {
        "model": "x",
        "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "toolu_00", "type": "function", "function": {"name": "get_weather",
                                                                    "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_00", "content": "sunny"},
            {"role": "user", "content": [{"type": "text", "text": "and now?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                    "parameters": {"type": "object",
                                                                   "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "required",
    }
    completion = await adapter.complete(target(anthropic_upstream, model="tool-model"), body)

    sent = anthropic_upstream.requests[-1]["body"]
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather in Paris?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_00", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_00", "content": "sunny"},
            {"type": "text", "text": "and now?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        ]},
    ]
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather",
                              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    assert sent["tool_choice"] == {"type": "any"}
    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [{"id": "toolu_01", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Paris"}'}}]


async def test_stream_events_become_openai_chunks(anthropic_upstream):
    chunks = [c async for c in adapter.stream(target(anthropic_upstream, model="cache-model"), BODY)]

    assert anthropic_upstream.requests[-1]["body"]["stream"] is True
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) \
        == "Echo: hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage = Usage.from_openai(chunks[-1]["usage"])
    assert chunks[-1]["choices"] == []
    assert (usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens) == (3, 11, 7)


async def test_stream_tool_use_becomes_tool_call_deltas(anthropic_upstream):
    chunks = [c async for c in adapter.stream(target(anthropic_upstream, model="tool-model"), BODY)]

    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0] == {"index": 0, "id": "toolu_01", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_stream_error_event_raises(anthropic_upstream):
    received = []

    async def drain():
        async for c in adapter.stream(target(anthropic_upstream, model="streamerror-model"), BODY):
            received.append(c)

    with pytest.raises(ProviderError) as exc:
        await drain()

    assert received
    assert exc.value.code == "upstream_stream_error"
    assert "Overloaded" in exc.value.message


@pytest.mark.parametrize(("status", "retryable", "ours"), [(529, True, 502), (429, True, 429), (400, False, 400),
                                                            (401, False, 502)])
async def test_error_bodies_map_status_and_keep_the_message(anthropic_upstream, status, retryable, ours):
    with pytest.raises(ProviderError) as exc:
        await adapter.complete(target(anthropic_upstream, model=f"fail-{status}"), BODY)

    assert (exc.value.retryable, exc.value.status, exc.value.upstream_status) == (retryable, ours, status)
    assert f"fake anthropic error {status}" in exc.value.message


async def test_upstream_message_echoing_the_key_is_scrubbed(anthropic_upstream):
    with pytest.raises(ProviderError) as exc:
        await adapter.complete(target(anthropic_upstream, model="badkey-model"), BODY)

    assert "invalid x-api-key: ***" in exc.value.message
    assert "sk-ant-secret" not in exc.value.message


async def test_embeddings_are_not_offered(anthropic_upstream):
    with pytest.raises(ProviderError) as exc:
        await adapter.embed(target(anthropic_upstream), {"model": "x", "input": "hi"})

    assert exc.value.status == 400
    assert not adapter.supports_embeddings
