"""POST /v1/responses: OpenAI's Responses API through the gateway with the official `openai` SDK,
translated to chat for every provider kind; stored responses and previous_response_id."""

import json
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest
from django.test import override_settings

from apps.analytics.models import UsageEvent
from apps.gateway.models import StoredResponse
from tests import factories as f

KINDS = ["openai_compatible", "anthropic", "gemini", "mock"]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def routed(kind: str, fake, *, alias: str = "m", upstream_model: str = "model-up"):
    provider = f.ProviderFactory(name=f"p-{kind}", kind=kind, api_base=fake.base_url if fake else "",
                                 credential=f.ProviderCredentialFactory() if fake else None)
    model_alias = f.ModelAliasFactory(alias=alias)
    f.DeploymentFactory(alias=model_alias, provider=provider, upstream_model=upstream_model)
    f.PriceFactory(model=alias, input_usd_per_mtok=Decimal("1"), output_usd_per_mtok=Decimal("2"))
    return model_alias


@pytest.fixture
def fakes(upstream, anthropic_upstream, gemini_upstream):
    return {"openai_compatible": upstream, "anthropic": anthropic_upstream, "gemini": gemini_upstream, "mock": None}


@pytest.fixture
def key(live_gateway):
    return f.ApiKeyFactory()


@pytest.fixture
def client(live_gateway, key):
    return openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)


@pytest.mark.parametrize("kind", KINDS)
def test_create_through_every_kind(kind, fakes, client):
    routed(kind, fakes[kind])

    resp = client.responses.create(model="m", instructions="Be brief.", input="hello there", max_output_tokens=50,
                                   temperature=0.5)

    assert resp.object == "response" and resp.status == "completed"
    assert "hello there" in resp.output_text
    event = UsageEvent.objects.get()
    assert (event.request_type, event.status, event.provider) == ("responses", 200, f"p-{kind}")
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (event.prompt_tokens, event.completion_tokens)
    assert resp.id == "resp_" + event.request_id.removeprefix("req_")


@pytest.mark.parametrize("kind", KINDS)
def test_stream_through_every_kind(kind, fakes, client):
    routed(kind, fakes[kind])

    with client.responses.stream(model="m", input="one two three") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()

    assert "".join(deltas) == final.output_text
    assert "one two three" in final.output_text
    event = UsageEvent.objects.get()
    assert (event.request_type, event.stream) == ("responses", True)
    assert final.usage.output_tokens == event.completion_tokens


def test_raw_stream_event_sequence(upstream, live_gateway, key):
    routed("openai_compatible", upstream)

    with httpx.stream("POST", f"{live_gateway}/v1/responses", headers={"authorization": f"Bearer {key.secret}"},
                      json={"model": "m", "input": "hi", "stream": True}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]

    names = [e["type"] for e in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in names
    assert names[-1] == "response.completed"
    assert events[-1]["response"]["usage"]["total_tokens"] > 0
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_input_items_and_function_tools(upstream, client):
    routed("openai_compatible", upstream, upstream_model="tool-up")

    first = client.responses.create(model="m", input=[{"role": "user", "content": "Weather in Paris?"}],
                                    tools=[WEATHER])
    call = next(o for o in first.output if o.type == "function_call")
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})

    second = client.responses.create(model="m", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}])

    assert second.output_text
    sent = upstream.requests[-1]["body"]
    assert sent["tools"][0] == {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER["parameters"]}}
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.call_id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny"}


def test_streamed_function_call(upstream, client):
    routed("openai_compatible", upstream, upstream_model="tool-up")

    with client.responses.stream(model="m", input="Weather in Paris?", tools=[WEATHER]) as stream:
        final = stream.get_final_response()

    call = next(o for o in final.output if o.type == "function_call")
    assert json.loads(call.arguments) == {"city": "Paris"}


def test_previous_response_id_continues_a_stored_conversation(upstream, client, key):
    routed("openai_compatible", upstream)

    first = client.responses.create(model="m", input="My name is Ada.", store=True, instructions="Be kind.")
    second = client.responses.create(model="m", input="What is my name?", previous_response_id=first.id,
                                     store=True)

    sent = upstream.requests[-1]["body"]["messages"]
    assert sent == [{"role": "user", "content": "My name is Ada."},
                    {"role": "assistant", "content": "Echo: My name is Ada."},
                    {"role": "user", "content": "What is my name?"}]  # instructions are not carried over
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text
    with client.responses.stream(model="m", input="And again?", previous_response_id=second.id) as stream:
        stream.get_final_response()
    assert len(upstream.requests[-1]["body"]["messages"]) == 5

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="not found"):
        client.responses.create(model="m", input="x", previous_response_id=first.id)


def test_stored_responses_are_per_tenant_and_only_when_asked(upstream, client, live_gateway):
    routed("openai_compatible", upstream)
    kept = client.responses.create(model="m", input="secret", store=True)
    not_kept = client.responses.create(model="m", input="x")
    outsider = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=f.ApiKeyFactory().secret, max_retries=0)

    assert StoredResponse.objects.filter(id=kept.id).exists()
    assert not StoredResponse.objects.filter(id=not_kept.id).exists()
    with pytest.raises(openai.NotFoundError):
        outsider.responses.retrieve(kept.id)
    with pytest.raises(openai.BadRequestError):
        outsider.responses.create(model="m", input="x", previous_response_id=kept.id)


@override_settings(GATEWAY_RESPONSES_STORE_TTL_S=0)
def test_store_refused_when_turned_off(upstream, client):
    routed("openai_compatible", upstream)

    with pytest.raises(openai.BadRequestError, match="store"):
        client.responses.create(model="m", input="x", store=True)


def test_unsupported_features_are_refused_clearly(upstream, client):
    routed("openai_compatible", upstream)

    with pytest.raises(openai.BadRequestError, match="only function tools"):
        client.responses.create(model="m", input="x", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.create(model="m", input="x", background=True)
    assert UsageEvent.objects.filter(request_type="responses", status=400).count() == 2


def test_cost_parity_across_chat_messages_and_responses(upstream, live_gateway, key):
    routed("openai_compatible", upstream)
    oa = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)
    an = anthropic.Anthropic(base_url=live_gateway, api_key=key.secret, max_retries=0)
    prompt = "What is the capital of France?"

    oa.chat.completions.create(model="m", max_tokens=64, messages=[{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": prompt}])
    an.messages.create(model="m", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": prompt}])
    oa.responses.create(model="m", max_output_tokens=64, instructions="Be brief.", input=prompt)

    rows = list(UsageEvent.objects.order_by("timestamp").values_list("request_type", "prompt_tokens",
                                                                       "completion_tokens", "cost"))
    assert [r[0] for r in rows] == ["chat", "messages", "responses"]
    assert len({r[1:] for r in rows}) == 1
    assert rows[0][3] > 0
    bodies = [r["body"] for r in list(upstream.requests)[-3:]]
    assert bodies[0]["messages"] == bodies[1]["messages"] == bodies[2]["messages"]


def test_cached_answer_replays_as_a_responses_stream(upstream, client):
    routed("openai_compatible", upstream)

    first = client.responses.create(model="m", input="same", extra_headers={"x-gateway-cache": "true"})
    with client.responses.stream(model="m", input="same", extra_headers={"x-gateway-cache": "true"}) as stream:
        replayed = stream.get_final_response()

    assert replayed.output_text == first.output_text
    assert list(UsageEvent.objects.order_by("timestamp").values_list("cached", flat=True)) == [False, True]
