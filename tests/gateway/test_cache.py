"""The response cache through POST /v1/chat/completions (Django test client, fake upstream)."""

import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import time_machine

from apps.analytics.models import UsageEvent
from apps.gateway import cache
from tests import factories as f
from tests.conftest import _free_port

pytestmark = pytest.mark.django_db


def post(client, secret, body):
    return client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


def chat(alias, content="hello", **extra):
    return {"model": alias, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def test_same_request_twice_within_a_tenant_hits(client, setup, upstream):
    first = post(client, setup.secret, chat(setup.alias, "what is 2+2"))
    second = post(client, setup.secret, chat(setup.alias, "what is 2+2"))

    assert (first["x-gateway-cache"], second["x-gateway-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert len(upstream.requests) == 1
    miss = UsageEvent.objects.get(request_id=first["x-request-id"])
    hit = UsageEvent.objects.get(request_id=second["x-request-id"])
    assert hit.cached
    assert hit.cost == 0
    assert hit.saved_cost == miss.cost > 0
    assert (hit.prompt_tokens, hit.completion_tokens) == (miss.prompt_tokens, miss.completion_tokens)
    assert second["x-gateway-cost-usd"] == "0"


def test_another_key_of_the_same_tenant_hits(client, setup, upstream):
    other_key = f.ApiKeyFactory(tenant=setup.tenant)
    post(client, setup.secret, chat(setup.alias))

    assert post(client, other_key.secret, chat(setup.alias))["x-gateway-cache"] == "hit"


def test_the_same_request_from_another_tenant_misses(client, setup, upstream):
    outsider = f.ApiKeyFactory()  # another tenant
    post(client, setup.secret, chat(setup.alias, "shared question"))

    resp = post(client, outsider.secret, chat(setup.alias, "shared question"))

    assert resp["x-gateway-cache"] == "miss"
    assert len(upstream.requests) == 2
    assert not UsageEvent.objects.get(request_id=resp["x-request-id"]).cached


@pytest.mark.parametrize("change", [
    {"content": "another prompt"},
    {"max_tokens": 5},
    {"seed": 7},
    {"stop": ["\n"]},
])
def test_a_different_prompt_or_parameter_misses(client, setup, upstream, change):
    post(client, setup.secret, chat(setup.alias, "base"))
    content = change.pop("content", "base")

    assert post(client, setup.secret, chat(setup.alias, content, **change))["x-gateway-cache"] == "miss"


def test_user_field_and_number_spelling_do_not_change_the_key(client, setup, upstream):
    post(client, setup.secret, chat(setup.alias, user="alice"))

    assert post(client, setup.secret, {**chat(setup.alias, user="bob"), "temperature": 0.0})["x-gateway-cache"] \
        == "hit"


def test_non_deterministic_requests_are_not_cached_by_default(client, setup, upstream):
    for body in (chat(setup.alias, temperature=0.7), {"model": setup.alias,
                                                      "messages": [{"role": "user", "content": "x"}]}):
        post(client, setup.secret, body)
        assert post(client, setup.secret, body)["x-gateway-cache"] == "miss"


def test_explicit_cache_true_caches_a_non_deterministic_request(client, setup, upstream):
    post(client, setup.secret, chat(setup.alias, temperature=1, cache=True))

    assert post(client, setup.secret, chat(setup.alias, temperature=1, cache=True))["x-gateway-cache"] == "hit"


def test_explicit_cache_false_neither_reads_nor_writes(client, setup, upstream):
    post(client, setup.secret, chat(setup.alias, cache=False))
    assert post(client, setup.secret, chat(setup.alias))["x-gateway-cache"] == "miss"

    assert post(client, setup.secret, chat(setup.alias, cache=False))["x-gateway-cache"] == "miss"


def test_key_default_off_is_overridden_per_request(client, setup, upstream):
    s = f.ApiKeyFactory(tenant=setup.tenant, cache_enabled=False)
    post(client, s.secret, chat(setup.alias))
    assert post(client, s.secret, chat(setup.alias))["x-gateway-cache"] == "miss"

    post(client, s.secret, chat(setup.alias, cache=True))
    assert post(client, s.secret, chat(setup.alias, cache=True))["x-gateway-cache"] == "hit"


def test_tenant_default_off_unless_the_key_turns_it_on(client, setup, upstream):
    tenant = f.TenantFactory(cache_enabled=False)
    off = f.ApiKeyFactory(tenant=tenant)
    on = f.ApiKeyFactory(tenant=tenant, cache_enabled=True)
    post(client, off.secret, chat(setup.alias))
    assert post(client, off.secret, chat(setup.alias))["x-gateway-cache"] == "miss"

    post(client, on.secret, chat(setup.alias))
    assert post(client, on.secret, chat(setup.alias))["x-gateway-cache"] == "hit"


def test_entries_expire_after_the_ttl(client, setup, upstream, settings):
    settings.GATEWAY_CACHE_BACKEND = "memory"
    cache.cache_reset()
    tenant = f.TenantFactory(cache_ttl_s=600)
    s = f.ApiKeyFactory(tenant=tenant)
    s.alias = setup.alias
    short = f.ApiKeyFactory(tenant=tenant, cache_ttl_s=60)
    with time_machine.travel(datetime(2031, 1, 1, tzinfo=UTC), tick=False) as clock:
        post(client, s.secret, chat(s.alias, "tenant ttl"))
        post(client, short.secret, chat(s.alias, "key ttl"))
        clock.shift(timedelta(seconds=61))
        assert post(client, short.secret, chat(s.alias, "key ttl"))["x-gateway-cache"] == "miss"
        assert post(client, s.secret, chat(s.alias, "tenant ttl"))["x-gateway-cache"] == "hit"
        clock.shift(timedelta(seconds=600))
        assert post(client, s.secret, chat(s.alias, "tenant ttl"))["x-gateway-cache"] == "miss"


def test_entries_over_the_size_limit_are_not_stored(client, setup, upstream, settings):
    settings.GATEWAY_CACHE_MAX_ENTRY_BYTES = 200
    post(client, setup.secret, chat(setup.alias, "a long answer " * 20))

    assert post(client, setup.secret, chat(setup.alias, "a long answer " * 20))["x-gateway-cache"] == "miss"


def test_memory_backend_evicts_the_least_recently_used():
    backend = cache.MemoryBackend(max_entries=2)

    async def run():
        await backend.set("a", b"1", 60)
        await backend.set("b", b"2", 60)
        await backend.get("a")
        await backend.set("c", b"3", 60)
        return [await backend.get(k) for k in "abc"]

    import asyncio

    assert asyncio.run(run()) == [b"1", None, b"3"]


def test_unreachable_redis_is_a_miss_and_the_request_succeeds_fast(client, setup, upstream, shared_state_at,
                                                                   settings):
    port = _free_port()  # nothing listens there
    settings.GATEWAY_CACHE_BACKEND, settings.GATEWAY_CACHE_TIMEOUT_S = "redis", 0.2

    with shared_state_at(f"redis://127.0.0.1:{port}/0"):
        started = time.monotonic()
        first = post(client, setup.secret, chat(setup.alias))
        second = post(client, setup.secret, chat(setup.alias))
        elapsed = time.monotonic() - started

    assert (first.status_code, second.status_code) == (200, 200)
    assert (first["x-gateway-cache"], second["x-gateway-cache"]) == ("miss", "miss")
    assert elapsed < 5  # generous: each cache call is bounded by its 0.2 s deadline, never a hang


def test_redis_backend_stores_with_the_ttl(client, setup, upstream, settings):
    if not settings.REDIS_URL:
        pytest.skip("needs REDIS_URL")
    import redis

    post(client, setup.secret, chat(setup.alias, "ttl in redis"))

    r = redis.Redis.from_url(settings.REDIS_URL)
    keys = r.keys(f"llms:rc:{setup.tenant.id}:*")
    assert len(keys) == 1
    assert 0 < r.ttl(keys[0]) <= setup.tenant.cache_ttl_s


def test_embeddings_are_deterministic_and_cached_by_default(client, setup, upstream):
    setup.deployment.alias.supports_embeddings = True
    setup.deployment.alias.save()
    body = orjson.dumps({"model": setup.alias, "input": ["alpha", "beta"]})

    def embed():
        return client.post("/v1/embeddings", data=body, content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {setup.secret}")

    first, second = embed(), embed()

    assert (first.status_code, second.status_code) == (200, 200)
    assert (first["x-gateway-cache"], second["x-gateway-cache"]) == ("miss", "hit")
    assert second.json()["data"] == first.json()["data"]
    assert len(upstream.requests) == 1


def test_a_hard_budget_does_not_stop_requests_without_max_tokens_from_hitting(client, setup, upstream):
    """Admission caps max_tokens at the model's limit under a hard budget; the entry must still be
    stored under the key the request was looked up by."""
    f.BudgetFactory(tenant=setup.tenant, limit_usd=1000)
    body = chat(setup.alias, "what is 2+2")

    first, second = post(client, setup.secret, body), post(client, setup.secret, body)

    assert (first["x-gateway-cache"], second["x-gateway-cache"]) == ("miss", "hit")
    assert len(upstream.requests) == 1


def test_a_streamed_miss_under_a_hard_budget_is_replayed_next_time(live_gateway, live_setup, upstream):
    import httpx

    f.BudgetFactory(tenant=live_setup.tenant, limit_usd=1000)
    body = chat(live_setup.alias, "what is 2+2", stream=True)
    headers = {"Authorization": f"Bearer {live_setup.secret}"}

    first = httpx.post(f"{live_gateway}/v1/chat/completions", json=body, headers=headers, timeout=30)
    second = httpx.post(f"{live_gateway}/v1/chat/completions", json=body, headers=headers, timeout=30)

    assert (first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]) == ("miss", "hit")
    assert "data: [DONE]" in second.text
    assert len(upstream.requests) == 1


def test_an_answer_shortened_to_fit_a_budget_is_not_cached(client, setup, upstream):
    budget = f.BudgetFactory(tenant=setup.tenant, limit_usd="0.0001", shrink_max_tokens=True)
    body = chat(setup.alias, "what is 2+2", max_tokens=1000)
    assert post(client, setup.secret, body)["x-gateway-max-tokens-lowered"]
    budget.limit_usd = 1000
    budget.save()
    from apps.gateway.selectors import routing_table_invalidate

    routing_table_invalidate()

    again = post(client, setup.secret, body)

    assert again["x-gateway-cache"] == "miss"
    assert upstream.requests[-1]["body"]["max_tokens"] == 1000


def test_ledger_rows_name_repeats_by_a_tenant_scoped_digest_never_the_text(client, setup, upstream):
    """What the cost recommendations count repeated prompts by: the cache key's digest, also with
    the cache off, on every request the cache did not answer."""
    off = [post(client, setup.secret, chat(setup.alias, "the same question", cache=False)) for _ in range(2)]
    other = post(client, setup.secret, chat(setup.alias, "another question", cache=False))
    outsider = post(client, f.ApiKeyFactory().secret, chat(setup.alias, "the same question", cache=False))
    miss = post(client, setup.secret, chat(setup.alias, "the same question"))
    hit = post(client, setup.secret, chat(setup.alias, "the same question"))
    row = {r.request_id: r for r in UsageEvent.objects.all()}
    digest = row[off[0]["x-request-id"]].prompt_hash

    assert hit["x-gateway-cache"] == "hit"
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert row[off[1]["x-request-id"]].prompt_hash == digest
    assert row[miss["x-request-id"]].prompt_hash == digest  # with the cache on, the same key
    assert row[other["x-request-id"]].prompt_hash not in ("", digest)
    assert row[outsider["x-request-id"]].prompt_hash not in ("", digest)  # another tenant
    assert row[hit["x-request-id"]].prompt_hash == ""  # answered by the cache: nothing to save
    assert "question" not in digest
