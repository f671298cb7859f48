"""Money through a live gateway with the OpenAI SDK: a streamed request costs exactly what the
same request costs unstreamed; DeepSeek's cache hits are billed at the cached rate; a provider
that reports no usage is counted and flagged estimated;
an unpriced model (when the tenant allows it) is recorded and alerted, never silently $0."""

from decimal import Decimal

import openai
import pytest

from apps.analytics.models import UsageEvent
from apps.billing.models import Alert
from tests import factories as f
from tests.conftest import make_setup

D = Decimal
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "name three prime numbers"}]


def sdk_for(live_gateway, secret):
    return openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=secret, max_retries=0)


def run_three_ways(sdk, alias):
    """The same request: not streamed, streamed with usage, streamed without. Returns ledger rows."""
    plain = sdk.chat.completions.with_raw_response.create(model=alias, messages=MESSAGES, max_tokens=50)
    with_usage = list(sdk.chat.completions.create(model=alias, messages=MESSAGES, max_tokens=50, stream=True,
                                                  stream_options={"include_usage": True}))
    without = list(sdk.chat.completions.create(model=alias, messages=MESSAGES, max_tokens=50, stream=True))
    assert without
    assert with_usage
    rows = list(UsageEvent.objects.order_by("timestamp", "id"))
    assert [r.stream for r in rows] == [False, True, True]
    return plain, with_usage, rows


def priced(setup):
    setup.price.input_usd_per_mtok = D("2.50")
    setup.price.output_usd_per_mtok = D("10.00")
    setup.price.save()


def test_stream_costs_exactly_what_the_same_request_costs_unstreamed(live_gateway, upstream):
    setup = make_setup(upstream)
    priced(setup)

    plain, chunks, rows = run_three_ways(sdk_for(live_gateway, setup.secret), setup.alias)

    usage = plain.parse().usage
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
    expected = (D(usage.prompt_tokens) * D("2.50") + D(usage.completion_tokens) * D("10.00")) / D(1_000_000)
    assert [r.cost for r in rows] == [expected] * 3
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(usage.prompt_tokens,
                                                                       usage.completion_tokens)] * 3
    assert not any(r.estimated for r in rows)
    assert plain.headers["x-gateway-cost-usd"] == str(rows[0].cost)
    assert all(r.price_id == setup.price.id for r in rows)


def test_mock_provider_stream_parity(live_gateway):
    setup = make_setup(None, kind="mock", alias="mock-model", upstream_model="mock-up")
    priced(setup)

    _, _, rows = run_three_ways(sdk_for(live_gateway, setup.secret), setup.alias)

    assert rows[0].cost > 0
    assert len({r.cost for r in rows}) == 1
    assert not any(r.estimated for r in rows)


def test_provider_without_usage_is_counted_and_flagged_estimated(live_gateway, upstream):
    setup = make_setup(upstream, upstream_model="nousage-up")
    priced(setup)

    _, chunks, rows = run_three_ways(sdk_for(live_gateway, setup.secret), setup.alias)

    assert all(r.estimated for r in rows)
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in rows)
    assert len({(r.prompt_tokens, r.completion_tokens, r.cost) for r in rows}) == 1
    assert rows[0].cost > 0
    assert chunks[-1].usage.completion_tokens == rows[1].completion_tokens  # the counted usage is reported


DEEPSEEK_USAGE = {"prompt_tokens": 1200, "completion_tokens": 350, "total_tokens": 1550,
                  "prompt_cache_hit_tokens": 1000, "prompt_cache_miss_tokens": 200}


@pytest.fixture
def deepseek_upstream(upstream):
    """The fake upstream answering `deepseek-live` with DeepSeek's usage (cache hits under its own
    names, on the finish chunk when streaming)."""
    model = upstream.script_usage("deepseek-live", DEEPSEEK_USAGE, on_finish_chunk=True)
    yield upstream
    upstream.scripts.pop(model, None)


def test_deepseek_cache_hits_are_billed_at_the_cached_rate_streamed_or_not(live_gateway, deepseek_upstream):
    setup = make_setup(deepseek_upstream, alias="deepseek-chat", upstream_model="deepseek-live")
    setup.price.input_usd_per_mtok, setup.price.output_usd_per_mtok = D("0.27"), D("1.10")
    setup.price.cached_input_usd_per_mtok = D("0.07")
    setup.price.save()

    plain, chunks, rows = run_three_ways(sdk_for(live_gateway, setup.secret), setup.alias)

    # 200 * 0.27 + 1000 * 0.07 + 350 * 1.10 = 509 micro-dollars, not 709 (every prompt token at 0.27)
    assert [r.cost for r in rows] == [D("0.000509")] * 3
    assert [(r.prompt_tokens, r.cached_tokens, r.completion_tokens) for r in rows] == [(1200, 1000, 350)] * 3
    assert plain.parse().usage.prompt_tokens_details.cached_tokens == 1000
    assert [c.usage.prompt_tokens_details.cached_tokens for c in chunks if c.usage][-1] == 1000


def test_unpriced_model_is_recorded_and_alerted_once(live_gateway, upstream, eager_celery, mailoutbox):
    tenant = f.TenantFactory(allow_unpriced_models=True, timezone="America/New_York")
    setup = make_setup(upstream, tenant=tenant, alias="brand-new-model")
    setup.price.delete()
    f.BudgetFactory(tenant=tenant, alert_emails=["finops@t.test"])
    sdk = sdk_for(live_gateway, setup.secret)

    for _ in range(3):
        sdk.chat.completions.create(model=setup.alias, messages=MESSAGES)

    rows = list(UsageEvent.objects.all())
    assert len(rows) == 3
    assert all(r.price_id is None and r.cost == 0 and r.prompt_tokens > 0 for r in rows)
    alert = Alert.objects.get()
    assert (alert.kind, alert.model, alert.tenant_id, alert.budget_id) == ("unpriced_model", "brand-new-model",
                                                                           tenant.id, None)
    assert alert.email_status == "sent"
    assert len(mailoutbox) == 1
    assert "brand-new-model" in mailoutbox[0].body


@pytest.mark.django_db
def test_unpriced_model_is_refused_when_the_tenant_does_not_allow_it(client, upstream):
    setup = make_setup(upstream, alias="no-price")
    setup.price.delete()

    resp = client.post("/v1/chat/completions", {"model": "no-price", "messages": MESSAGES},
                       content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {setup.secret}")

    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "model_not_priced"
    assert "has no price" in resp.json()["error"]["message"]
    assert not Alert.objects.exists()


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_stream_fires_the_threshold_alert_as_a_plain_request_does(live_gateway, upstream, eager_celery, mailoutbox,
                                                                    settings, include_usage):
    settings.BUDGET_FORECAST_MIN_ELAPSED = 2  # thresholds only
    setup = make_setup(upstream)
    budget = f.BudgetFactory(tenant=setup.tenant, limit_usd=D("0.00004"), enforcement="soft",
                             alert_thresholds=["0.5"], alert_emails=["ops@t.test"])
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}

    chunks = list(sdk_for(live_gateway, setup.secret).chat.completions.create(
        model=setup.alias, messages=MESSAGES, max_tokens=50, stream=True, **extra))

    assert chunks
    row = UsageEvent.objects.get()
    assert row.stream and row.cost == D("0.000021")  # 11 prompt tokens at $1/M + 5 completion at $2/M
    alert = Alert.objects.get(budget=budget)
    assert (alert.kind, alert.threshold, alert.email_status) == ("threshold", D("0.5"), "sent")
    assert len(mailoutbox) == 1
