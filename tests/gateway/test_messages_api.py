"""POST /v1/messages: Anthropic's Messages API through the gateway, with the official `anthropic`
SDK, to an OpenAI-compatible deployment (translated) and an Anthropic one (passed through)."""

from decimal import Decimal

import anthropic
import httpx
import pytest

from apps.analytics.models import UsageEvent
from tests import factories as f

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def routed(kind: str, fake, *, alias: str = "claude-gw", upstream_model: str = "model-up"):
    provider = f.ProviderFactory(name=f"p-{kind}", kind=kind, api_base=fake.base_url,
                                 credential=f.ProviderCredentialFactory())
    model_alias = f.ModelAliasFactory(alias=alias)
    f.DeploymentFactory(alias=model_alias, provider=provider, upstream_model=upstream_model)
    f.PriceFactory(model=alias, input_usd_per_mtok=Decimal("1"), output_usd_per_mtok=Decimal("2"))
    return model_alias


@pytest.fixture(params=["openai_compatible", "anthropic"])
def kind(request):
    return request.param


@pytest.fixture
def fake(kind, upstream, anthropic_upstream):
    return anthropic_upstream if kind == "anthropic" else upstream


@pytest.fixture
def key(live_gateway):
    return f.ApiKeyFactory()


@pytest.fixture
def client(live_gateway, key):
    return anthropic.Anthropic(base_url=live_gateway, api_key=key.secret, max_retries=0)


def test_create_answers_a_message_and_books_it_as_messages(kind, fake, client):
    routed(kind, fake)

    msg = client.messages.create(model="claude-gw", max_tokens=50, system="Be brief.",
                                 messages=[{"role": "user", "content": "hello there"}])

    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and "hello there" in msg.content[0].text
    assert msg.stop_reason == "end_turn"
    event = UsageEvent.objects.get()
    assert (event.request_type, event.status, event.provider) == ("messages", 200, f"p-{kind}")
    assert msg.usage.output_tokens == event.completion_tokens > 0
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) + \
        (msg.usage.cache_creation_input_tokens or 0) == event.prompt_tokens
    assert event.cost > 0 and not event.estimated
    sent = fake.requests[-1]["body"]
    if kind == "anthropic":
        assert sent["system"] == "Be brief." and sent["model"] == "model-up"
    else:
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."}


def test_async_client(kind, fake, live_gateway, key):
    import asyncio

    routed(kind, fake)

    async def ask():
        async with anthropic.AsyncAnthropic(base_url=live_gateway, api_key=key.secret, max_retries=0) as c:
            return await c.messages.create(model="claude-gw", max_tokens=20,
                                           messages=[{"role": "user", "content": "async hi"}])

    msg = asyncio.run(ask())

    assert "async hi" in msg.content[0].text
    assert UsageEvent.objects.get().request_type == "messages"


def test_stream_and_final_message(kind, fake, client):
    routed(kind, fake)

    with client.messages.stream(model="claude-gw", max_tokens=50,
                                messages=[{"role": "user", "content": "one two three"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()

    assert text == "Echo: one two three" == final.content[0].text
    assert final.stop_reason == "end_turn"
    event = UsageEvent.objects.get()
    assert (event.request_type, event.stream, event.status) == ("messages", True, 200)
    assert final.usage.output_tokens == event.completion_tokens
    assert not event.estimated


def test_raw_stream_has_anthropics_event_sequence(kind, fake, live_gateway, key):
    routed(kind, fake)

    with httpx.stream("POST", f"{live_gateway}/v1/messages", headers={"x-api-key": key.secret,
                                                                      "anthropic-version": "2023-06-01"},
                      json={"model": "claude-gw", "max_tokens": 20, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as resp:
        names = [line[7:] for line in resp.iter_lines() if line.startswith("event: ")]

    names = [n for n in names if n != "ping"]
    assert names[0] == "message_start" and names[1] == "content_block_start"
    assert "content_block_delta" in names
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tools_round_trip(kind, fake, client):
    routed(kind, fake, upstream_model="tool-model")

    first = client.messages.create(model="claude-gw", max_tokens=100, tools=[WEATHER],
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    call = next(b for b in first.content if b.type == "tool_use")
    assert (first.stop_reason, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})

    second = client.messages.create(model="claude-gw", max_tokens=100, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21C"}]},
    ])

    assert second.content
    sent = fake.requests[-1]["body"]
    if kind == "anthropic":
        assert sent["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id,
                                                     "content": "Sunny, 21C"}
        assert sent["tools"][0]["input_schema"] == WEATHER["input_schema"]
    else:
        assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21C"}
        assert second.stop_reason == "end_turn"
    assert UsageEvent.objects.filter(request_type="messages", status=200).count() == 2


def test_streamed_tool_call_is_a_tool_use_block(kind, fake, client):
    routed(kind, fake, upstream_model="tool-model")

    with client.messages.stream(model="claude-gw", max_tokens=100, tools=[WEATHER],
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        final = stream.get_final_message()

    call = next(b for b in final.content if b.type == "tool_use")
    assert (final.stop_reason, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})


def test_tools_translate_to_openai_tool_calls_and_back(upstream, client):
    routed("openai_compatible", upstream)

    client.messages.create(model="claude-gw", max_tokens=100, tools=[WEATHER],
                           tool_choice={"type": "tool", "name": "get_weather"}, stop_sequences=["END"],
                           metadata={"user_id": "u-1"}, messages=[
                               {"role": "user", "content": "Weather in Paris?"},
                               {"role": "assistant", "content": [
                                   {"type": "text", "text": "Checking."},
                                   {"type": "tool_use", "id": "toolu_9", "name": "get_weather",
                                    "input": {"city": "Paris"}}]},
                               {"role": "user", "content": [
                                   {"type": "tool_result", "tool_use_id": "toolu_9", "content": "Sunny"},
                                   {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                "data": "iVBOR"}}]}])

    sent = upstream.requests[-1]["body"]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER["input_schema"]}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["stop"] == ["END"] and sent["user"] == "u-1"
    assert sent["messages"][1] == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_9", "content": "Sunny"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}
    assert sent["messages"][3]["content"] == [image]


def test_anthropic_deployment_gets_the_body_nearly_unchanged(anthropic_upstream, client):
    routed("anthropic", anthropic_upstream, upstream_model="cache-model")
    system = [{"type": "text", "text": "Long context", "cache_control": {"type": "ephemeral"}}]

    msg = client.messages.create(model="claude-gw", max_tokens=64, system=system,
                                 thinking={"type": "enabled", "budget_tokens": 32},
                                 messages=[{"role": "user", "content": "hi"}],
                                 metadata={"user_id": "u-7"})

    sent = anthropic_upstream.requests[-1]["body"]
    assert sent["system"] == system and sent["thinking"] == {"type": "enabled", "budget_tokens": 32}
    assert sent["metadata"] == {"user_id": "u-7"} and sent["max_tokens"] == 64
    assert (msg.usage.cache_read_input_tokens, msg.usage.cache_creation_input_tokens) == (11, 7)
    event = UsageEvent.objects.get()
    assert (event.cached_tokens, event.cache_write_tokens) == (11, 7)


def test_gateway_metadata_rides_in_headers_and_metadata(upstream, client, key):
    routed("openai_compatible", upstream)
    f.BudgetFactory(tenant=key.tenant, scope="budget_id", scope_value="proj-a", enforcement="soft")
    f.BudgetFactory(tenant=key.tenant, scope="budget_id", scope_value="proj-b", enforcement="soft")

    client.messages.create(model="claude-gw", max_tokens=10, messages=[{"role": "user", "content": "a"}],
                           extra_headers={"x-gateway-budget-id": "proj-a", "x-gateway-priority": "7"})
    client.messages.create(model="claude-gw", max_tokens=10, messages=[{"role": "user", "content": "b"}],
                           metadata={"user_id": "u", "budget_id": "proj-b"})

    events = list(UsageEvent.objects.order_by("timestamp").values_list("budget_id", "priority"))
    assert events == [("proj-a", 7), ("proj-b", 5)]
    assert "budget_id" not in (upstream.requests[-1]["body"].get("metadata") or {})


def test_bad_key_raises_authentication_error(upstream, live_gateway):
    routed("openai_compatible", upstream)
    client = anthropic.Anthropic(base_url=live_gateway, api_key="sk-wrong", max_retries=0)

    with pytest.raises(anthropic.AuthenticationError) as err:
        client.messages.create(model="claude-gw", max_tokens=10, messages=[{"role": "user", "content": "x"}])

    assert err.value.status_code == 401
    assert err.value.body["error"]["type"] == "authentication_error"


def test_bearer_token_is_accepted(upstream, live_gateway, key):
    routed("openai_compatible", upstream)
    client = anthropic.Anthropic(base_url=live_gateway, auth_token=key.secret, max_retries=0)

    assert client.messages.create(model="claude-gw", max_tokens=10,
                                  messages=[{"role": "user", "content": "x"}]).content


def test_model_not_allowed_raises_permission_denied(upstream, live_gateway):
    routed("openai_compatible", upstream)
    key = f.ApiKeyFactory(allowed_models=["other"])
    client = anthropic.Anthropic(base_url=live_gateway, api_key=key.secret, max_retries=0)

    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.create(model="claude-gw", max_tokens=10, messages=[{"role": "user", "content": "x"}])


def test_endpoint_scope_applies(upstream, live_gateway):
    routed("openai_compatible", upstream)
    key = f.ApiKeyFactory(allowed_endpoints=["/v1/chat/completions"])
    client = anthropic.Anthropic(base_url=live_gateway, api_key=key.secret, max_retries=0)

    with pytest.raises(anthropic.PermissionDeniedError) as err:
        client.messages.create(model="claude-gw", max_tokens=10, messages=[{"role": "user", "content": "x"}])

    assert "/v1/messages" in str(err.value)


def test_rate_limit_raises_rate_limit_error(upstream, live_gateway):
    routed("openai_compatible", upstream)
    key = f.ApiKeyFactory(rpm=1)
    client = anthropic.Anthropic(base_url=live_gateway, api_key=key.secret, max_retries=0)
    client.messages.create(model="claude-gw", max_tokens=10, messages=[{"role": "user", "content": "x"}])

    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="claude-gw", max_tokens=10, messages=[{"role": "user", "content": "x"}])


def test_budget_exceeded_surfaces_our_message(kind, fake, client, key):
    routed(kind, fake)
    f.BudgetFactory(tenant=key.tenant, name="tiny", limit_usd=Decimal("0.0001"), period="daily")

    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model="claude-gw", max_tokens=1000, messages=[{"role": "user", "content": "x"}])

    assert err.value.status_code == 402
    assert err.value.body["error"]["type"] == "billing_error"
    assert "Budget 'tiny'" in str(err.value)
    assert UsageEvent.objects.get().status == 402


def test_invalid_body_is_anthropic_shaped_400(upstream, live_gateway, key):
    routed("openai_compatible", upstream)

    resp = httpx.post(f"{live_gateway}/v1/messages", headers={"x-api-key": key.secret},
                      json={"model": "claude-gw", "messages": [{"role": "user", "content": "x"}]})

    assert resp.status_code == 400
    assert resp.json()["type"] == "error"
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in resp.json()["error"]["message"]
    assert UsageEvent.objects.get().request_type == "messages"


def test_count_tokens_from_anthropic_or_estimated(anthropic_upstream, upstream, client):
    routed("anthropic", anthropic_upstream, alias="claude-a")
    routed("openai_compatible", upstream, alias="claude-o")
    messages = [{"role": "user", "content": "one two three four"}]

    counted = client.messages.count_tokens(model="claude-a", messages=messages)
    raw = client.messages.with_raw_response.count_tokens(model="claude-o", messages=messages)

    assert counted.input_tokens == 7  # the fake's count: 4 words + 3
    assert anthropic_upstream.requests[-1]["path"] == "/v1/messages/count_tokens"
    assert raw.headers["x-gateway-estimated"] == "true"
    assert raw.parse().input_tokens > 0
    assert not UsageEvent.objects.exists()


def test_cached_answer_replays_as_a_message_stream(kind, fake, client):
    routed(kind, fake)
    ask = {"model": "claude-gw", "max_tokens": 30, "messages": [{"role": "user", "content": "same question"}],
           "extra_headers": {"x-gateway-cache": "true"}}

    first = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        replayed = stream.get_final_message()

    assert replayed.content[0].text == first.content[0].text
    assert list(UsageEvent.objects.order_by("timestamp").values_list("cached", "cost")) == [
        (False, UsageEvent.objects.order_by("timestamp").first().cost), (True, Decimal(0))]


def test_mid_stream_upstream_error_is_an_anthropic_error_event(anthropic_upstream, client):
    routed("anthropic", anthropic_upstream, upstream_model="streamerror-model")

    with pytest.raises(anthropic.APIStatusError, match="Overloaded"), \
            client.messages.stream(model="claude-gw", max_tokens=30,
                                   messages=[{"role": "user", "content": "a b c"}]) as stream:
        stream.get_final_message()

    event = UsageEvent.objects.get()
    assert (event.status, event.request_type) == (502, "messages")


def test_plan_carries_the_dialect_to_async_work():
    from apps.gateway import schemas

    request = schemas.parse_translated({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                        "max_tokens": 5}, dialect="messages",
                                       native={"model": "m", "max_tokens": 5, "thinking": {"type": "enabled"},
                                               "messages": [{"role": "user", "content": "x" * 500}]})

    again = schemas.GatewayRequest.from_dict(request.to_dict())

    assert (again.dialect, again.native) == ("messages", request.native)
    assert request.prompt_bound > 500  # the native body, bigger than its chat translation, bounds the prompt


@pytest.mark.django_db(transaction=True)
def test_async_header_queues_and_the_worker_books_it_as_messages(anthropic_upstream, monkeypatch):
    """`x-gateway-async: true`: 202, and the worker sends the Anthropic deployment the native body."""
    import orjson
    from django.test import Client

    from apps.gateway import async_requests, queues
    from apps.gateway.models import AsyncRequest

    monkeypatch.setattr(queues, "publish", lambda *a, **k: None)
    routed("anthropic", anthropic_upstream)
    key = f.ApiKeyFactory()
    body = {"model": "claude-gw", "max_tokens": 20, "thinking": {"type": "enabled", "budget_tokens": 10},
            "messages": [{"role": "user", "content": "later"}]}

    resp = Client().post("/v1/messages", data=orjson.dumps(body), content_type="application/json",
                         HTTP_X_API_KEY=key.secret, HTTP_X_GATEWAY_ASYNC="true")
    assert resp.status_code == 202
    async_requests.async_request_run(request_id=resp.json()["id"])

    assert AsyncRequest.objects.get(id=resp.json()["id"]).status == "completed"
    assert anthropic_upstream.requests[-1]["body"]["thinking"] == {"type": "enabled", "budget_tokens": 10}
    assert UsageEvent.objects.get().request_type == "messages"
