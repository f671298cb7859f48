"""Money truth at the edges: a hold ends exactly once whatever fails after it is taken, admission is
idempotent by request id, a request is parsed once with strict types, and attribution cannot be
forged. Through the Django test client (one instance) on whichever state backend is configured."""

from __future__ import annotations

import ast
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils import timezone

from apps.analytics.models import UsageEvent
from apps.billing import budgets as billing_budgets
from apps.billing.models import Budget
from apps.billing.selectors import budget_ref
from tests import factories as f
from tests.money import SETTLE, spend

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def post(client, secret, body, path="/v1/chat/completions"):
    return client.post(path, data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


def chat(alias, content="hi", **extra):
    return {"model": alias, "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def hard(setup):
    return f.BudgetFactory(tenant=setup.tenant, name="hard", limit_usd=Decimal("5"), period="total")


def live_post(base_url: str, secret: str, body: dict):
    """Through the live gateway (uvicorn in this process), reading a stream to its end."""
    import httpx

    with httpx.Client(base_url=base_url, timeout=30) as http, http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"}) as resp:
        return resp.status_code, resp.headers, resp.read()


# --- one exit per hold ------------------------------------------------------------------------------


class Injected(Exception):
    pass


def _boom(*args, **kwargs):
    raise Injected("injected")


async def _aboom(*args, **kwargs):
    raise Injected("injected")


# Every step after admission, and how it is made to fail.
STEPS = {
    "provider call": ("apps.gateway.router.call_with_fallbacks", _aboom),
    "cache store": ("apps.gateway.cache.store", _aboom),
    "cost": ("apps.gateway.pipeline._cost", _boom),
    "settle": (SETTLE, _aboom),
    "ledger write": ("apps.gateway.pipeline.usage_event_record", _aboom),
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("stream", [False, True])
def test_a_hold_ends_exactly_once_whatever_fails_after_admission(live_gateway, live_setup, monkeypatch, step,
                                                                  stream):
    setup = live_setup
    hard = f.BudgetFactory(tenant=setup.tenant, name="hard", limit_usd=Decimal("5"), period="total")
    target, fail = STEPS[step]
    monkeypatch.setattr(target, fail)

    cacheable = {"temperature": 0} if step == "cache store" else {}
    status, headers, body = live_post(live_gateway, setup.secret,
                                      chat(setup.alias, max_tokens=20, stream=stream, **cacheable))

    assert billing_budgets.open_holds() == []  # ended, and by this process: nothing left open
    spent, held = spend(hard)
    if step != "settle":
        assert held == 0  # given back or settled in the counters, not left to expire
    rows = UsageEvent.objects.filter(request_id=headers["x-request-id"])
    if step == "ledger write":
        # The row could not be made durable (not even journaled): no 2xx body, no [DONE].
        assert b"[DONE]" not in body
        assert status >= 500 or b'"error"' in body
        return
    assert rows.count() == 1, body
    if step in ("cache store", "cost"):
        assert b'"error"' in body and b"[DONE]" not in body
    if step == "provider call":
        assert status == 500 and orjson.loads(body)["error"]["code"] == "internal_error"
        assert rows.get().status == 500 and spent == 0


def test_a_second_exit_is_a_bug_the_hold_refuses():
    hold = billing_budgets.hold_unbacked(request_id="req_twice", ttl_s=60)
    async_to_sync(hold.release)()

    with pytest.raises(billing_budgets.HoldEnded):
        async_to_sync(hold.settle)(cost_usd=Decimal("0.1"), tokens=1)


def test_a_provider_error_of_any_type_answers_500_with_a_row_and_no_locked_budget(client, setup, monkeypatch):
    """Break 7: an exception other than the gateway's own kept its hold for 15 minutes (and
    answered 500 with no ledger row); repeated, it locked a tenant's whole budget."""
    budget = f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.0005"), period="total")
    monkeypatch.setattr("apps.gateway.providers.openai_compatible.OpenAICompatibleAdapter.complete", _aboom)

    answers = [post(client, setup.secret, chat(setup.alias, max_tokens=100)) for _ in range(5)]

    assert [a.status_code for a in answers] == [500] * 5  # never 402: nothing stays held
    assert {a.json()["error"]["code"] for a in answers} == {"internal_error"}
    assert UsageEvent.objects.filter(status=500).count() == 5
    assert spend(budget) == (Decimal(0), Decimal(0))


# --- admission is idempotent by request id ---------------------------------------------------------


def test_admitting_the_same_request_id_twice_takes_one_hold_and_one_slot(setup, hard):
    """Break 6: a batch line run again after its worker died took a second hold under the same id,
    and `held` stayed above zero forever on a total budget."""
    from apps.core.state import LimitCell, tenant_key

    ref = budget_ref(Budget.objects.select_related("tenant").get(pk=hard.pk))
    slot = LimitCell(key=tenant_key(ref.tenant_id, "rl", "test", setup.key.id, "rpm"), limit=1, cost=1)

    def take():
        billing_budgets._open.clear()  # a fresh worker process: it knows nothing of the first run
        return async_to_sync(billing_budgets.hold_take)(
            request_id="batch_x_line_3", budgets=[ref], amount_usd=Decimal("0.25"), at=timezone.now(), ttl_s=600,
            limits=[slot])

    first, again = take(), take()

    assert isinstance(first, billing_budgets.Hold) and isinstance(again, billing_budgets.Hold)  # rpm=1 admits both
    assert spend(hard) == (Decimal(0), Decimal("0.25"))  # one hold, not two
    async_to_sync(again.settle)(cost_usd=Decimal("0.1"), tokens=3)
    assert spend(hard) == (Decimal("0.1"), Decimal(0))


# --- parsed once, strictly ---------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "param"), [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"stream": "false"}, "stream"),
    ({"temperature": "0.5"}, "temperature"),
    ({"metadata": {"priority": "9"}}, "metadata.priority"),
    ({"cache": "yes"}, "cache"),
    ({"metadata": {"budget_id": "team\u0000red"}}, None),
    ({"metadata": {"source_id": "bot\u001b[31m"}}, "metadata.source_id"),
])
def test_strings_where_types_are_expected_and_control_characters_are_a_400_before_admission(client, setup, hard,
                                                                                            extra, param):
    resp = post(client, setup.secret, chat(setup.alias, **extra))

    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    if param:
        assert resp.json()["error"]["param"] == param
    assert spend(hard) == (Decimal(0), Decimal(0))  # refused before admission: nothing held


def test_deeply_nested_json_is_a_clear_400(client, setup):
    deep = "[" * 1000 + '"x"' + "]" * 1000
    resp = client.post("/v1/chat/completions", content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {setup.secret}",
                       data=f'{{"model": "{setup.alias}", "messages": [{{"role": "user", "content": {deep}}}]}}')

    assert resp.status_code == 400  # was a 500 with no ledger row
    assert "nested" in resp.json()["error"]["message"]


def test_embeddings_of_token_arrays_are_refused_at_validation(client, setup):
    """`"input": [1]` crashed in the adapter after admission and kept its hold."""
    resp = post(client, setup.secret, {"model": setup.alias, "input": [1]}, path="/v1/embeddings")

    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"


# --- attribution ---------------------------------------------------------------------------------------


def test_a_key_bound_to_a_source_may_not_book_on_another(client, setup):
    """Break 8: metadata.source_id was recorded as the client said, whatever the key."""
    f.SourceFactory(tenant=setup.tenant, name="finance-etl", type="service")

    resp = post(client, setup.secret, chat(setup.alias, metadata={"source_id": "finance-etl"}))

    assert resp.status_code == 403 and resp.json()["error"]["code"] == "source_mismatch"
    assert post(client, setup.secret, chat(setup.alias, metadata={"source_id": setup.source.name})).status_code == 200


def test_a_tenant_wide_key_books_on_the_named_source_whose_limits_and_budgets_apply(client, setup):
    etl = f.SourceFactory(tenant=setup.tenant, name="etl", type="service")
    f.RateLimitFactory(tenant=setup.tenant, scope="source", scope_value="etl", rpm=1)
    budget = f.BudgetFactory(tenant=setup.tenant, scope="source", scope_value="etl", limit_usd=Decimal("1"),
                             period="total")
    setup.key.source = None
    setup.key.save()

    first = post(client, setup.secret, chat(setup.alias, metadata={"source_id": "etl"}))
    second = post(client, setup.secret, chat(setup.alias, metadata={"source_id": "etl"}))
    undeclared = post(client, setup.secret, chat(setup.alias, metadata={"source_id": "nope"}))

    assert first.status_code == 200 and second.status_code == 429  # the source's rpm applies
    assert undeclared.status_code == 403 and undeclared.json()["error"]["code"] == "source_mismatch"
    row = UsageEvent.objects.get(request_id=first["x-request-id"])
    assert (row.source_id, row.source_ref, row.source_type) == (etl.id, "etl", "service")
    assert spend(budget)[0] == row.cost > 0  # booked on the source's budget


def test_an_undeclared_budget_id_is_refused_unless_the_tenant_allows_free_form_ids(client, setup):
    f.BudgetFactory(tenant=setup.tenant, scope="budget_id", scope_value="team-red", enforcement="soft")

    typo = post(client, setup.secret, chat(setup.alias, metadata={"budget_id": "team-rde"}))
    declared = post(client, setup.secret, chat(setup.alias, metadata={"budget_id": "team-red"}))
    setup.tenant.allow_freeform_budget_ids = True
    setup.tenant.save()
    from apps.gateway import pipeline

    pipeline._auth_cache.forget()
    free = post(client, setup.secret, chat(setup.alias, metadata={"budget_id": "anything"}))

    assert typo.status_code == 400 and typo.json()["error"]["code"] == "unknown_budget_id"
    assert typo.json()["error"]["param"] == "metadata.budget_id"
    assert (declared.status_code, free.status_code) == (200, 200)


def test_a_binding_default_budget_id_cannot_be_escaped(client, setup):
    f.BudgetFactory(tenant=setup.tenant, scope="budget_id", scope_value="team-red", enforcement="soft")
    f.BudgetFactory(tenant=setup.tenant, scope="budget_id", scope_value="team-blue", enforcement="soft")
    setup.key.default_budget_id, setup.key.budget_id_binding = "team-red", True
    setup.key.save()

    other = post(client, setup.secret, chat(setup.alias, metadata={"budget_id": "team-blue"}))
    plain = post(client, setup.secret, chat(setup.alias))

    assert other.status_code == 403 and other.json()["error"]["code"] == "budget_id_not_allowed"
    assert plain.status_code == 200
    assert UsageEvent.objects.get(request_id=plain["x-request-id"]).budget_id == "team-red"


# --- what one warm request costs the shared state -----------------------------------------------------

REDIS_ROUND_TRIPS_PER_REQUEST = 2  # admission (every limit and hold) + settle; see README "Admission"


@pytest.mark.skipif(not settings.REDIS_URL, reason="counts Redis round trips")
def test_a_warm_chat_with_every_admission_feature_is_one_db_write_and_two_redis_round_trips(
        client, setup, monkeypatch, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from apps.core import redis as core_redis

    setup.key.rpm, setup.key.tpm = 1000, 1_000_000
    setup.key.default_budget_id = "team-red"
    setup.key.save()
    f.RateLimitFactory(tenant=setup.tenant, scope="tenant", rpm=1000, tpm=1_000_000)
    f.RateLimitFactory(tenant=setup.tenant, scope="source", scope_value=setup.source.name, rpm=1000)
    f.BudgetFactory(tenant=setup.tenant, name="t", limit_usd=Decimal("100"), alert_thresholds=[0.5, 0.8])
    f.BudgetFactory(tenant=setup.tenant, name="s", scope="source", scope_value=setup.source.name,
                    limit_usd=Decimal("50"), period="daily")
    f.BudgetFactory(tenant=setup.tenant, name="b", scope="budget_id", scope_value="team-red", enforcement="soft")
    # tag and end-user scopes: a tag's and each end user's own limits and budgets, in the same round trip
    f.RateLimitFactory(tenant=setup.tenant, scope="tag", scope_value="support", rpm=1000, tpm=1_000_000)
    f.RateLimitFactory(tenant=setup.tenant, scope="user", scope_value="*", rpm=1000)
    f.BudgetFactory(tenant=setup.tenant, name="tag", scope="tag", scope_value="support", limit_usd=Decimal("10"))
    f.BudgetFactory(tenant=setup.tenant, name="each-user", scope="user", scope_value="*", limit_usd=Decimal("1"))
    tagged = {"user": "alice", "metadata": {"tags": ["support", "eu"]}}
    settings.GATEWAY_AUTH_CACHE_TTL_S = settings.GATEWAY_ROUTES_CACHE_TTL_S = 60
    settings.GATEWAY_COOLDOWN_CHECK_CACHE_S = 60
    warm = post(client, setup.secret, chat(setup.alias, max_tokens=10, **tagged))  # warms the caches
    assert warm.status_code == 200, warm.content

    trips = []
    real_run = core_redis.run

    async def counting_run(make, **kw):
        trips.append(make)
        return await real_run(make, **kw)

    monkeypatch.setattr(core_redis, "run", counting_run)
    with CaptureQueriesContext(connection) as queries:
        resp = post(client, setup.secret, chat(setup.alias, max_tokens=10, **tagged))

    assert resp.status_code == 200
    assert len(queries.captured_queries) == 1  # no read either: limits and budgets come from the cached policy
    import redis

    from apps.billing.models import Budget

    r = redis.Redis.from_url(settings.REDIS_URL)
    each_user = Budget.objects.get(name="each-user")
    tenant = f"llms:{{t{setup.tenant.id}}}"
    assert r.keys(f"{tenant}:rl:tag:support:rpm:*") and r.keys(f"{tenant}:rl:user:*")
    assert r.keys(f"{tenant}:bud:{each_user.id}:u*:spent")  # alice's own counter of the per-end-user budget
    writes = [q["sql"] for q in queries.captured_queries if q["sql"].split()[0] in ("INSERT", "UPDATE", "DELETE")]
    assert len(writes) == 1 and "analytics_usageevent" in writes[0]
    assert len(trips) == REDIS_ROUND_TRIPS_PER_REQUEST


# --- dependencies point one way ---------------------------------------------------------------------


def test_billing_analytics_and_keys_import_no_gateway_module():
    """Statically, including imports inside functions (none may dodge the rule)."""
    offenders = []
    for app in ("billing", "analytics", "keys", "core"):
        for path in (ROOT / "apps" / app).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("apps.gateway")]
    assert offenders == []


def test_importing_billing_loads_no_gateway_module():
    code = ("import os, sys; os.environ['DJANGO_SETTINGS_MODULE'] = 'config.settings'\n"
            "import django\nfrom django.conf import settings\n"
            "settings.INSTALLED_APPS  # load\n"
            "settings.INSTALLED_APPS[:] = [a for a in settings.INSTALLED_APPS if a != 'apps.gateway']\n"
            "django.setup()\n"
            "import apps.billing.budgets, apps.billing.services, apps.billing.selectors, apps.billing.tasks\n"
            "import apps.billing.alerts, apps.billing.admin, apps.billing.metrics\n"
            "print(sorted(m for m in sys.modules if m.startswith('apps.gateway')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "LLMS_DEMO": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_stream_that_stalls_mid_way_ends_after_the_idle_timeout_with_its_row(live_gateway, live_setup,
                                                                                settings):
    """Before: a stalled stream waited for the 120 s read timeout, holding its budget."""
    setup = live_setup
    hard = f.BudgetFactory(tenant=setup.tenant, name="hard", limit_usd=Decimal("5"), period="total")
    settings.GATEWAY_STREAM_IDLE_TIMEOUT_S = 0.3
    setup.deployment.upstream_model = "drip-5000"  # a chunk, then five seconds of silence before the next
    setup.deployment.save()

    status, headers, body = live_post(live_gateway, setup.secret, chat(setup.alias, max_tokens=20, stream=True))

    assert status == 200
    assert b"upstream_stream_stalled" in body and b"[DONE]" not in body
    row = UsageEvent.objects.get(request_id=headers["x-request-id"])
    assert (row.status, row.error_code) == (502, "upstream_stream_stalled")
    assert spend(hard)[1] == 0 and billing_budgets.open_holds() == []


def test_key_create_without_a_source_makes_a_tenant_wide_key(setup):
    from io import StringIO

    from django.core.management import call_command

    from apps.keys.models import ApiKey

    out = StringIO()
    call_command("key_create", "--tenant", setup.tenant.slug, "--name", "platform", "--budget-id", "team-red",
                 "--budget-id-binding", stdout=out)

    key = ApiKey.objects.get(tenant=setup.tenant, name="platform")
    assert out.getvalue().strip().startswith("sk-")
    assert (key.source_id, key.default_budget_id, key.budget_id_binding) == (None, "team-red", True)


def test_the_reconcile_task_raises_a_counter_the_ledger_shows_to_be_low(setup):
    """A settle that never reached the counters (Redis away at that moment) is caught up."""
    from apps.billing.tasks import budget_counters_reconcile

    budget = f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("1"), period="total")
    assert spend(budget) == (Decimal(0), Decimal(0))  # the counter exists now, at zero
    f.UsageEventFactory(tenant=setup.tenant, cost=Decimal("0.25"), timestamp=timezone.now())
    assert spend(budget)[0] == 0  # the counter does not know

    assert budget_counters_reconcile() >= 1

    assert spend(budget)[0] == Decimal("0.25")
    assert budget_counters_reconcile() == 0  # nothing low any more
