"""The official OpenAI Python SDK against a live gateway (uvicorn, real sockets end to end)."""

import openai
import pytest

from apps.analytics.models import UsageEvent


@pytest.fixture
def sdk(live_gateway, live_setup):
    return openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=live_setup.secret, max_retries=0)


def test_sdk_lists_models(sdk, live_setup):
    assert [m.id for m in sdk.models.list()] == [live_setup.alias, f"{live_setup.alias}@gpt-up"]


def test_sdk_chat(sdk, live_setup):
    resp = sdk.chat.completions.with_raw_response.create(
        model=live_setup.alias, messages=[{"role": "user", "content": "ping"}])
    completion = resp.parse()

    assert completion.choices[0].message.content == "Echo: ping"
    assert resp.headers["x-gateway-cache"] == "miss"
    event = UsageEvent.objects.get(request_id=resp.headers["x-request-id"])
    assert event.completion_tokens == completion.usage.completion_tokens
    assert event.cost > 0


def test_sdk_stream_with_usage_costs_the_same_as_non_stream(sdk, live_setup):
    plain = sdk.chat.completions.with_raw_response.create(
        model=live_setup.alias, messages=[{"role": "user", "content": "count to three"}])
    stream = sdk.chat.completions.create(
        model=live_setup.alias, messages=[{"role": "user", "content": "count to three"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: count to three"
    assert chunks[-1].usage.completion_tokens == plain.parse().usage.completion_tokens
    events = list(UsageEvent.objects.order_by("timestamp"))
    assert len(events) == 2
    assert events[0].cost == events[1].cost and events[1].stream and not events[1].estimated


def test_sdk_stream_without_usage_request_gets_no_usage_chunk(sdk, live_setup):
    chunks = list(sdk.chat.completions.create(
        model=live_setup.alias, messages=[{"role": "user", "content": "x"}], stream=True))

    assert all(c.usage is None for c in chunks)
    assert UsageEvent.objects.get().completion_tokens > 0


def test_sdk_stream_broken_midway_raises_in_the_client(sdk, live_setup):
    live_setup.deployment.upstream_model = "break-2"
    live_setup.deployment.save()

    stream = sdk.chat.completions.create(
        model=live_setup.alias, messages=[{"role": "user", "content": "one two three four"}], stream=True)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)

    assert received  # the first chunks arrived before the break
    from apps.gateway.tokens import estimate_text

    relayed = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    event = UsageEvent.objects.get()
    assert event.status == 502 and event.estimated
    assert event.completion_tokens == estimate_text(relayed)  # billed for what was produced


def test_sdk_error_classes(live_gateway, live_setup):
    good = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=live_setup.secret, max_retries=0)
    bad = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key="sk-wrong", max_retries=0)
    msgs = [{"role": "user", "content": "x"}]

    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=live_setup.alias, messages=msgs)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.BadRequestError) as exc:
        good.chat.completions.create(model=live_setup.alias, messages=msgs, temperature=7)
    assert exc.value.body["param"] == "temperature"

    live_setup.deployment.upstream_model = "fail-503"
    live_setup.deployment.save()
    from apps.gateway import selectors

    selectors.routing_table_invalidate()
    with pytest.raises(openai.InternalServerError) as exc:
        good.chat.completions.create(model=live_setup.alias, messages=msgs)
    assert exc.value.status_code == 502


def test_sdk_embeddings(sdk, live_setup, upstream):
    from apps.gateway.models import ModelAlias

    ModelAlias.objects.filter(alias=live_setup.alias).update(supports_embeddings=True)

    resp = sdk.embeddings.create(model=live_setup.alias, input=["a b", "c"])

    assert len(resp.data) == 2
    assert upstream.requests[-1]["path"] == "/v1/embeddings"
    assert UsageEvent.objects.get().request_type == "embeddings"
