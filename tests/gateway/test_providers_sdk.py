"""Every provider kind through a live gateway with the OpenAI SDK: chat, stream, embeddings."""

from decimal import Decimal

import openai
import pytest

from apps.analytics.models import UsageEvent
from apps.gateway.models import ModelAlias, Provider
from tests import factories as f

KINDS = ["openai", "azure_openai", "anthropic", "gemini", "openai_compatible", "mock"]


@pytest.fixture
def fakes(upstream, anthropic_upstream, gemini_upstream, azure_upstream):
    return {"openai": upstream, "openai_compatible": upstream, "azure_openai": azure_upstream,
            "anthropic": anthropic_upstream, "gemini": gemini_upstream, "mock": None}


def provider_for(kind: str, fake) -> Provider:
    return f.ProviderFactory(name=f"p-{kind}", kind=kind, api_base=fake.base_url if fake else "",
                             credential=f.ProviderCredentialFactory() if fake else None)


def routed(kind: str, fake, *, alias: str = "m", upstream_model: str = "model-up", embeddings: bool = True):
    model_alias = f.ModelAliasFactory(alias=alias, supports_embeddings=embeddings)
    f.DeploymentFactory(alias=model_alias, provider=provider_for(kind, fake), upstream_model=upstream_model)
    f.PriceFactory(model=alias, input_usd_per_mtok=Decimal("1"), output_usd_per_mtok=Decimal("2"))
    return model_alias


@pytest.fixture
def client(live_gateway):
    key = f.ApiKeyFactory()
    return openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)


@pytest.mark.parametrize("kind", KINDS)
def test_chat_through_every_kind(kind, fakes, client):
    routed(kind, fakes[kind])

    resp = client.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "hello"}])

    assert "hello" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    event = UsageEvent.objects.get()
    assert (event.provider, event.status) == (f"p-{kind}", 200)
    assert event.completion_tokens == resp.usage.completion_tokens
    assert not event.estimated


@pytest.mark.parametrize("kind", KINDS)
def test_stream_through_every_kind(kind, fakes, client):
    routed(kind, fakes[kind])

    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two three"}],
                                                 stream=True, stream_options={"include_usage": True}))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "one two three" in text
    assert chunks[-1].usage.completion_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    event = UsageEvent.objects.get()
    assert event.stream
    assert event.completion_tokens == chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "anthropic"])
def test_embeddings_through_every_kind_that_offers_them(kind, fakes, client):
    routed(kind, fakes[kind])

    resp = client.embeddings.create(model="m", input=["a b", "c"])

    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) > 0 for d in resp.data)
    assert UsageEvent.objects.get().request_type == "embeddings"


def test_anthropic_embeddings_are_a_clear_400(fakes, client, anthropic_upstream):
    routed("anthropic", fakes["anthropic"])

    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="m", input="a")

    assert exc.value.body["code"] == "embeddings_not_supported"
    assert "anthropic" in exc.value.body["message"]
    assert not anthropic_upstream.requests


def test_anthropic_cache_tokens_reach_the_ledger(fakes, client):
    routed("anthropic", fakes["anthropic"], upstream_model="cache-model")

    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))

    assert resp.usage.prompt_tokens_details.cached_tokens == 11
    rows = list(UsageEvent.objects.order_by("timestamp").values_list("cached_tokens", "cache_write_tokens", "stream"))
    assert rows == [(11, 7, False), (11, 7, True)]


@pytest.mark.parametrize("kind", ["anthropic", "gemini", "azure_openai", "openai"])
def test_stream_broken_midway_ends_with_an_error_event(kind, fakes, client):
    routed(kind, fakes[kind], upstream_model="break-1")
    ModelAlias.objects.update(supports_embeddings=False)

    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "one two three four five six"}], stream=True)
    received = []
    with pytest.raises(openai.APIError):
        received.extend(stream)  # the error arrives while iterating

    assert received
    event = UsageEvent.objects.get()
    assert (event.status, event.error_code) == (502, "upstream_stream_broken")
