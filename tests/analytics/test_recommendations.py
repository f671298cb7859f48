"""Cost recommendations computed on a generated ledger with known answers, on the dashboard page and
the /api/ resource, and never across tenants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from apps.analytics import recommendations as rec
from apps.analytics.models import UsageEvent
from apps.analytics.selectors import recommendations_for_tenant
from tests import factories as f

pytestmark = pytest.mark.django_db

TTL = 3600


def _alias(alias, provider, price_in, price_out, *, context=128_000, embeddings=None, batch=Decimal("0.5")):
    a = f.ModelAliasFactory(alias=alias, context_window=context, supports_embeddings=embeddings)
    f.DeploymentFactory(alias=a, provider=provider, upstream_model=alias)
    f.PriceFactory(model=alias, input_usd_per_mtok=Decimal(price_in), output_usd_per_mtok=Decimal(price_out),
                   batch_discount=batch, effective_from=timezone.now() - timedelta(days=90))


def _rows(tenant, n, *, at, spread=timedelta(0), **fields):
    """n ledger rows of one kind, built by the factory and inserted together."""
    rows = f.UsageEventFactory.build_batch(n, tenant=tenant, **fields)
    for i, r in enumerate(rows):
        r.timestamp = at + spread * i
    UsageEvent.objects.bulk_create(rows)


@pytest.fixture
def ledger(world):
    """acme: short prompts to gpt-4o (stream), a big non-stream ETL, repeated FAQ prompts; globex:
    its own short prompts to gpt-4o. Decoys the figures must leave out are noted."""
    openai = f.ProviderFactory(name="openai-main", kind="openai")
    local = f.ProviderFactory(name="local-vllm", kind="openai_compatible")
    _alias("gpt-4o", openai, "2.5", "10")
    _alias("gpt-4o-mini", openai, "0.15", "0.6")
    _alias("gpt-small-context", openai, "0.1", "0.1", context=8_000)  # cheaper, but a smaller context
    _alias("text-embedding-3-small", openai, "0.02", "0", embeddings=True)  # cheaper, but no chat
    _alias("tiny-local", local, "0.01", "0.01", batch=Decimal(0))  # cheaper, another vendor; no batch API
    now = timezone.now()
    acme, globex = world.acme, world.globex
    recent = now - timedelta(days=3)
    # 200 short prompts (180 + 50 tokens, streamed): 0.00095 each at gpt-4o's price.
    _rows(acme, 200, at=recent, spread=timedelta(minutes=1), source_ref="support-bot", model="gpt-4o",
          provider="openai-main", prompt_tokens=180, completion_tokens=50, cost=Decimal("0.00095"), stream=True)
    # Decoys: older than 30 days, a failure, a cache hit.
    _rows(acme, 1, at=now - timedelta(days=31), source_ref="support-bot", model="gpt-4o", provider="openai-main",
          prompt_tokens=180, completion_tokens=50, cost=Decimal("5"), stream=True)
    _rows(acme, 1, at=recent, source_ref="support-bot", model="gpt-4o", provider="openai-main", status=500,
          prompt_tokens=180, completion_tokens=0, cost=Decimal("5"), stream=True)
    _rows(acme, 1, at=recent, source_ref="support-bot", model="gpt-4o", provider="openai-main", cached=True,
          prompt_tokens=180, completion_tokens=50, cost=Decimal(0), saved_cost=Decimal("0.00095"), stream=True)
    # 1,200 long non-stream prompts (3,000 + 100 tokens): 0.0085 each, 10.2 in all.
    _rows(acme, 1200, at=recent, spread=timedelta(seconds=30), source_ref="etl", source_type="service",
          model="gpt-4o", provider="openai-main", prompt_tokens=3000, completion_tokens=100, cost=Decimal("0.0085"))
    # Decoys: the same volume on a provider without a batch API, and lines already in a batch.
    _rows(acme, 1100, at=recent, source_ref="etl", source_type="service", model="tiny-local",
          provider="local-vllm", prompt_tokens=3000, completion_tokens=100, cost=Decimal("0.0001"))
    _rows(acme, 1000, at=recent, source_ref="nightly", source_type="service", model="gpt-4o",
          provider="openai-main", prompt_tokens=3000, completion_tokens=100, cost=Decimal("0.0085"), batch_id="b1")
    # Repeated FAQ prompts at 0.01 each: "aaaa" 5 times in one TTL window, "bbbb" 3 times in it and
    # twice two windows later; "cccc" once. Decoys: a repeat older than 30 days, a failed one.
    window = datetime.fromtimestamp((int((now - timedelta(days=2)).timestamp()) // TTL) * TTL, tz=UTC)
    faq = {"source_ref": "faq", "model": "gpt-4o-mini", "provider": "openai-main", "cost": Decimal("0.01"),
           "stream": True}
    _rows(acme, 5, at=window + timedelta(seconds=10), spread=timedelta(minutes=5), prompt_hash="aaaa", **faq)
    _rows(acme, 3, at=window + timedelta(seconds=20), spread=timedelta(minutes=5), prompt_hash="bbbb", **faq)
    _rows(acme, 2, at=window + timedelta(hours=2), spread=timedelta(minutes=5), prompt_hash="bbbb", **faq)
    _rows(acme, 1, at=window + timedelta(seconds=30), prompt_hash="cccc", **faq)
    _rows(acme, 1, at=now - timedelta(days=40), prompt_hash="aaaa", **faq)
    _rows(acme, 1, at=window + timedelta(seconds=40), prompt_hash="aaaa", **{**faq, "cost": Decimal(1)}, status=502)
    # globex: 300 short prompts of its own secret source.
    _rows(globex, 300, at=recent, source_ref="globex-secret-source", model="gpt-4o", provider="openai-main",
          prompt_tokens=100, completion_tokens=100, cost=Decimal("0.00125"), prompt_hash="aaaa")
    return world


def _by_kind(report):
    out = {}
    for r in report["recommendations"]:
        out.setdefault(r.kind, []).append(r)
    return out


def test_recommendations_on_a_generated_ledger_have_the_known_answers(ledger):
    report = recommendations_for_tenant(tenant=ledger.acme)
    kinds = _by_kind(report)

    assert report["window_days"] == 30
    assert sorted(kinds) == ["batch", "cache", "cheaper_model"]
    # Cheaper model: 200 × (180, 50) tokens on gpt-4o-mini: 36,000 × 0.15 + 10,000 × 0.6 per Mtok.
    [model] = kinds["cheaper_model"]
    assert (model.source_id, model.model, model.alternative) == ("support-bot", "gpt-4o", "gpt-4o-mini")
    assert (model.requests, model.prompt_tokens, model.completion_tokens) == (200, 36_000, 10_000)
    assert model.current_cost_usd == Decimal("0.19")
    assert model.alternative_cost_usd == Decimal("0.0114")
    assert model.saving_usd == Decimal("0.1786")
    assert ("sent 200 requests averaging 180 prompt tokens to gpt-4o" in model.arithmetic
            and "36,000 × $0.15/Mtok + 10,000 × $0.6/Mtok = $0.0114 instead of $0.19" in model.arithmetic
            and "saving $0.1786 = $0.19 − $0.0114" in model.arithmetic), model.arithmetic
    assert "same capabilities: chat, streaming, 128,000-token context" in model.arithmetic
    # Cache: windows (aaaa: 5), (bbbb: 3), (bbbb: 2) at 0.01: 0.10 spent, 0.03 kept, 7 repeats.
    [cache] = kinds["cache"]
    assert (cache.model, cache.requests, cache.saving_usd) == ("gpt-4o-mini", 10, Decimal("0.07"))
    assert cache.details == {"distinct_prompts": 2, "windows": 3, "repeats": 7, "ttl_s": TTL}
    assert "$0.07 = $0.10 − $0.03" in cache.arithmetic
    # Batch: the ETL's 1,200 non-stream requests on OpenAI at half price; not tiny-local, not batch lines.
    [batch] = kinds["batch"]
    assert (batch.source_id, batch.model, batch.requests) == ("etl", "gpt-4o", 1200)
    assert (batch.current_cost_usd, batch.saving_usd) == (Decimal("10.2"), Decimal("5.1"))
    assert "saving up to $5.10 = $10.20 × 0.5" in batch.arithmetic
    assert [r.kind for r in report["recommendations"]] == ["batch", "cheaper_model", "cache"]


def test_a_cheaper_alias_needs_the_same_capabilities_and_vendor():
    base = rec.AliasInfo(alias="big", chat=True, embeddings=False, streaming=True, context_window=128_000,
                         max_output_tokens=16_384, provider_kinds=frozenset({"openai"}))
    same = rec.AliasInfo(**{**_fields(base), "alias": "small"})
    assert rec.equivalent(base, same)
    for change in ({"chat": False, "embeddings": True}, {"streaming": False}, {"context_window": 8_000},
                   {"max_output_tokens": 4_096}, {"provider_kinds": frozenset({"anthropic"})}):
        assert not rec.equivalent(base, rec.AliasInfo(**{**_fields(same), **change})), change
    assert not rec.equivalent(base, base)


def _fields(info):
    return {k: getattr(info, k) for k in info.__slots__}


def test_repeats_split_by_the_window_are_a_lower_bound_of_what_a_cache_answers():
    # 3 requests 1 s apart across a window edge: a real cache answers 2, the windows count 1.
    groups = [{"model": "m", "prompt_hash": "h", "requests": 2, "spent": Decimal("0.02"), "max_cost": Decimal("0.01")}]
    [r] = rec.recommend_cache(groups, ttl_s=60, cache_enabled=False)
    assert r.saving_usd == Decimal("0.01")
    assert rec.recommend_cache([{**groups[0], "spent": Decimal("0.01"), "requests": 1}], ttl_s=60,
                               cache_enabled=False) == []


def test_nothing_to_recommend_on_an_empty_ledger(world):
    assert recommendations_for_tenant(tenant=world.acme)["recommendations"] == []


def test_the_page_names_the_saving_with_its_arithmetic_and_only_the_tenants_own(client, ledger):
    client.force_login(ledger.acme_manager)
    html = client.get("/dashboard/recommendations/").content.decode()

    assert "Send support-bot&#x27;s short prompts to gpt-4o-mini instead of gpt-4o: save $0.18" in html
    assert "36,000 × $0.15/Mtok + 10,000 × $0.6/Mtok = $0.0114 instead of $0.19" in html
    assert "Cache repeated prompts to gpt-4o-mini: save $0.07" in html
    assert "saving up to $5.10 = $10.20 × 0.5" in html
    assert "globex" not in html
    assert 'href="/dashboard/recommendations/"' in client.get("/dashboard/").content.decode()

    client.force_login(ledger.globex_manager)
    html = client.get("/dashboard/recommendations/").content.decode()
    assert "globex-secret-source" in html
    assert "support-bot" not in html and "etl" not in html and "acme" not in html
    assert "globex-secret-source" not in client.get("/dashboard/recommendations/?tenant=acme").content.decode()


def test_the_api_resource_is_documented_and_tenant_scoped(ledger):
    acme = APIClient()
    acme.force_authenticate(ledger.acme_viewer)
    body = acme.get("/api/recommendations/").json()

    [tenant] = body
    assert tenant["tenant"] == "acme" and tenant["window_days"] == 30
    first = tenant["recommendations"][0]
    assert (first["kind"], first["saving_usd"], first["current_cost_usd"]) == ("batch", "5.1000000000",
                                                                               "10.2000000000")
    assert "× 0.5" in first["arithmetic"] and first["assumption"].startswith("An upper bound")
    assert "globex" not in str(body)
    assert acme.get("/api/recommendations/", {"tenant": "globex"}).json() == []

    globex = APIClient()
    globex.force_authenticate(ledger.globex_manager)
    [g] = globex.get("/api/recommendations/").json()
    assert sorted((r["kind"], r["source_id"]) for r in g["recommendations"]) == [
        ("cache", ""), ("cheaper_model", "globex-secret-source")]  # its own "aaaa" prompts, never acme's
    assert "support-bot" not in str(g)

    root = APIClient()
    root.force_authenticate(ledger.root)
    schema = root.get("/api/schema/", {"format": "json"}).json()
    props = schema["components"]["schemas"]["Recommendation"]["properties"]
    assert {"saving_usd", "arithmetic", "assumption", "kind"} <= set(props)
    assert "/api/recommendations/" in schema["paths"]


def test_anonymous_callers_get_nothing(client, ledger):
    assert APIClient().get("/api/recommendations/").status_code in (401, 403)
    assert client.get("/dashboard/recommendations/").status_code == 302


def test_a_report_is_two_ledger_queries_and_is_reused_for_a_few_minutes(ledger, django_assert_num_queries):
    # 2 on the ledger, 3 for the aliases (with deployments and providers), 1 for provider kinds, 1 for prices.
    with django_assert_num_queries(7) as ctx:
        first = recommendations_for_tenant(tenant=ledger.acme)
    assert sum("analytics_usageevent" in q["sql"] for q in ctx.captured_queries) == 2
    with django_assert_num_queries(0):
        assert recommendations_for_tenant(tenant=ledger.acme) is first
    assert recommendations_for_tenant(tenant=ledger.globex)["tenant"] == "globex"
