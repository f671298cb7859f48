"""The response cache seen through the official OpenAI SDK against a live gateway: a streamed hit
is an SSE replay of the stored answer, and a streamed miss is stored for later requests."""

import openai
import pytest

from apps.analytics.models import UsageEvent
from apps.gateway import selectors


@pytest.fixture
def sdk(live_gateway, live_setup):
    return openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=live_setup.secret, max_retries=0)


def ask(sdk, alias, content, **extra):
    return sdk.chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "user", "content": content}], temperature=0, **extra)


def test_a_streamed_hit_replays_the_same_content_as_sse(sdk, live_setup, upstream):
    plain = ask(sdk, live_setup.alias, "tell me once")

    raw = ask(sdk, live_setup.alias, "tell me once", stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())

    assert raw.headers["x-gateway-cache"] == "hit"
    assert raw.headers["content-type"].startswith("text/event-stream")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.parse().choices[0].message.content == "Echo: tell me once"
    assert chunks[-1].usage.completion_tokens == plain.parse().usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len(upstream.requests) == 1
    hit = UsageEvent.objects.get(request_id=raw.headers["x-request-id"])
    assert hit.cached
    assert hit.stream
    assert hit.cost == 0
    assert hit.saved_cost == UsageEvent.objects.get(request_id=plain.headers["x-request-id"]).cost


def test_a_streamed_miss_is_stored_for_streamed_and_plain_requests(sdk, live_setup, upstream):
    first = ask(sdk, live_setup.alias, "stream me", stream=True)
    first_text = "".join(c.choices[0].delta.content or "" for c in first.parse() if c.choices)

    again = ask(sdk, live_setup.alias, "stream me", stream=True)
    again_text = "".join(c.choices[0].delta.content or "" for c in again.parse() if c.choices)
    plain = ask(sdk, live_setup.alias, "stream me")

    assert first.headers["x-gateway-cache"] == "miss"
    assert (again.headers["x-gateway-cache"], plain.headers["x-gateway-cache"]) == ("hit", "hit")
    assert first_text == again_text == plain.parse().choices[0].message.content == "Echo: stream me"
    assert len(upstream.requests) == 1
    assert UsageEvent.objects.filter(cached=True).count() == 2


def test_a_stream_that_breaks_midway_is_not_stored(sdk, live_setup, upstream):
    live_setup.deployment.upstream_model = "break-2"
    live_setup.deployment.save()

    with pytest.raises(openai.APIError):
        list(ask(sdk, live_setup.alias, "one two three four", stream=True).parse())

    live_setup.deployment.upstream_model = "gpt-up"
    live_setup.deployment.save()
    selectors.routing_table_invalidate()
    assert ask(sdk, live_setup.alias, "one two three four").headers["x-gateway-cache"] == "miss"
