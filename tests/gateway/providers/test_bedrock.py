"""The Bedrock adapter against a fake Converse API that checks every SigV4 signature: the exact
request signed and sent, the translation back, streams in the AWS event-stream framing, errors."""

import orjson
import pytest
from botocore.eventstream import EventStreamBuffer

from apps.gateway.providers import ProviderError, Target, adapter_for
from apps.gateway.providers import bedrock as bedrock_module
from tests.fakes import bedrock_server as fake

adapter = adapter_for("bedrock")
SECRET = orjson.dumps({"aws_access_key_id": fake.ACCESS_KEY, "aws_secret_access_key": fake.SECRET_KEY,
                       "aws_session_token": fake.SESSION_TOKEN}).decode()
BODY = {"model": "x", "max_tokens": 64, "temperature": 0.2, "stop": ["END"],
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]}


def target(server, model="anthropic.claude-3-haiku-20240307-v1:0", *, secret=SECRET, region=fake.REGION, **options):
    return Target(kind="bedrock", api_base=server.base_url, upstream_model=model, secret=secret, options=options,
                  region=region)


async def test_converse_request_is_signed_and_translated(bedrock_upstream):
    completion = await adapter.complete(target(bedrock_upstream), BODY)

    sent = bedrock_upstream.requests[-1]
    assert sent["raw_path"] == "/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
    assert sent["headers"]["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={fake.ACCESS_KEY}/")
    assert f"/{fake.REGION}/bedrock/aws4_request" in sent["headers"]["Authorization"]
    assert sent["headers"]["X-Amz-Security-Token"] == fake.SESSION_TOKEN
    assert fake.SECRET_KEY not in str(sent["headers"])
    assert sent["raw"] == orjson.dumps(sent["body"])  # the bytes signed are the bytes sent
    assert sent["body"] == {"messages": [{"role": "user", "content": [{"text": "hello there"}]}],
                            "system": [{"text": "Be brief."}],
                            "inferenceConfig": {"maxTokens": 64, "temperature": 0.2, "stopSequences": ["END"]}}
    assert completion.body["choices"][0]["message"] == {"role": "assistant", "content": "Echo: hello there"}
    assert completion.body["choices"][0]["finish_reason"] == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)


async def test_a_wrong_secret_fails_the_signature_check(bedrock_upstream):
    with pytest.raises(ProviderError) as err:
        await adapter.complete(target(bedrock_upstream, secret=f"{fake.ACCESS_KEY}:wrong:{fake.SESSION_TOKEN}"), BODY)

    assert err.value.upstream_status == 403 and "signature" in err.value.message
    assert "wrong" not in err.value.message


async def test_credentials_from_the_environment_when_no_secret(bedrock_upstream, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", fake.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fake.SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", fake.SESSION_TOKEN)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    bedrock_module._chains.clear()

    completion = await adapter.complete(target(bedrock_upstream, secret=""), BODY)

    assert completion.body["choices"][0]["message"]["content"] == "Echo: hello there"
    bedrock_module._chains.clear()


async def test_an_arn_model_id_keeps_its_slash_encoded_and_the_signature_holds(bedrock_upstream):
    arn = "arn:aws:bedrock:eu-west-3:123456789012:inference-profile/eu.anthropic.claude"

    await adapter.complete(target(bedrock_upstream, model=arn), BODY)

    sent = bedrock_upstream.requests[-1]
    assert sent["raw_path"] == "/model/arn:aws:bedrock:eu-west-3:123456789012:inference-profile%2Feu.anthropic.claude" \
        "/converse"
    assert sent["model"] == arn


def test_endpoint_follows_the_deployment_region():
    t = Target(kind="bedrock", api_base="", upstream_model="m", region="ap-south-1", options={"region": "x"})

    assert bedrock_module.url_of(t, "converse") == "https://bedrock-runtime.ap-south-1.amazonaws.com/model/m/converse"
    assert bedrock_module.region_of(Target(kind="bedrock", api_base="", upstream_model="m",
                                           options={"region": "eu-central-1"})) == "eu-central-1"


async def test_tools_and_tool_results_translate_both_ways(bedrock_upstream):
    body = {"model": "x", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "Sunny"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                    "parameters": {"type": "object"}}}], "tool_choice": "required"}

    completion = await adapter.complete(target(bedrock_upstream, model="tool-model"), body)

    sent = bedrock_upstream.requests[-1]["body"]
    assert sent["messages"][1] == {"role": "assistant", "content": [
        {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Paris"}}}]}
    assert sent["messages"][2] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": "t1", "content": [{"text": "Sunny"}]}}]}
    assert sent["toolConfig"] == {"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather",
                                                          "inputSchema": {"json": {"type": "object"}}}}],
                                  "toolChoice": {"any": {}}}
    message = completion.body["choices"][0]["message"]
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert completion.body["choices"][0]["finish_reason"] == "tool_calls"


async def test_cache_tokens_are_part_of_the_prompt(bedrock_upstream):
    completion = await adapter.complete(target(bedrock_upstream, model="cache-model"), BODY)

    usage = completion.usage
    assert (usage.cached_tokens, usage.cache_write_tokens) == (11, 7)
    assert usage.prompt_tokens == 4 + 11 + 7


async def test_stream_decodes_the_event_stream_framing(bedrock_upstream):
    chunks = [c async for c in adapter.stream(target(bedrock_upstream), BODY)]

    sent = bedrock_upstream.requests[-1]
    assert sent["raw_path"].endswith("/converse-stream")
    assert sent["headers"]["Accept"] == "application/vnd.amazon.eventstream"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Echo: hello there"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["_gateway_usage"].completion_tokens == 3


async def test_streamed_tool_call(bedrock_upstream):
    chunks = [c async for c in adapter.stream(target(bedrock_upstream, model="tool-model"), BODY)]

    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert calls[0]["id"] == "tooluse_01" and calls[0]["function"]["name"] == "get_weather"
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'


async def test_exception_frame_mid_stream_raises(bedrock_upstream):
    with pytest.raises(ProviderError, match="modelStreamErrorException"):
        [c async for c in adapter.stream(target(bedrock_upstream, model="streamerror-model"), BODY)]


@pytest.mark.parametrize(("status", "ours", "retryable"), [(429, 429, True), (400, 400, False), (503, 502, True)])
async def test_errors_map_to_provider_errors(bedrock_upstream, status, ours, retryable):
    with pytest.raises(ProviderError) as err:
        await adapter.complete(target(bedrock_upstream, model=f"fail-{status}"), BODY)

    assert (err.value.status, err.value.retryable, err.value.upstream_status) == (ours, retryable, status)
    assert "fake bedrock error" in err.value.message


def test_fake_frames_decode_with_botocore():
    buf = EventStreamBuffer()
    buf.add_data(fake.event("messageStop", {"stopReason": "end_turn"}))

    (message,) = list(buf)

    assert message.headers[":event-type"] == "messageStop"
    assert orjson.loads(message.payload) == {"stopReason": "end_turn"}
