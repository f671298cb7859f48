"""GET /v1/budget: every budget that applies to the calling key, with limit, spent, held,
remaining and when it resets (in the tenant's time zone)."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine

from tests import factories as f
from tests.conftest import make_setup

pytestmark = pytest.mark.django_db

D = Decimal


def get(client, secret, query=""):
    return client.get(f"/v1/budget{query}", HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.fixture
def berlin(upstream):
    tenant = f.TenantFactory(timezone="Europe/Berlin")
    s = make_setup(upstream, tenant=tenant, default_budget_id="team-red")
    return s


def test_lists_every_budget_that_applies_to_the_key(client, berlin):
    t = berlin.tenant
    f.BudgetFactory(tenant=t, name="a-tenant", scope="tenant", limit_usd=D("100"))
    f.BudgetFactory(tenant=t, name="b-source", scope="source", scope_value=berlin.source.name, period="daily")
    f.BudgetFactory(tenant=t, name="c-key", scope="key", scope_value=berlin.key.name, period="total")
    f.BudgetFactory(tenant=t, name="d-default-id", scope="budget_id", scope_value="team-red", period="weekly")
    f.BudgetFactory(tenant=t, name="e-asked-id", scope="budget_id", scope_value="q4")
    f.BudgetFactory(tenant=t, name="x-other-source", scope="source", scope_value="someone-else")
    f.BudgetFactory(tenant=t, name="x-other-key", scope="key", scope_value="other-key")
    f.BudgetFactory(name="x-other-tenant", scope="tenant")

    plain = get(client, berlin.secret)
    asked = get(client, berlin.secret, "?budget_id=q4")

    assert plain.status_code == 200
    assert plain["x-request-id"]
    assert [b["name"] for b in plain.json()["data"]] == ["a-tenant", "b-source", "c-key", "d-default-id"]
    assert [b["name"] for b in asked.json()["data"]] == ["a-tenant", "b-source", "c-key", "d-default-id",
                                                         "e-asked-id"]


def test_spent_comes_from_the_ledger_of_the_period_and_scope(client, berlin):
    budget = f.BudgetFactory(tenant=berlin.tenant, name="src-monthly", scope="source",
                             scope_value=berlin.source.name, limit_usd=D("1.00"), period="monthly",
                             enforcement="hard")
    f.UsageEventFactory(tenant=berlin.tenant, source=berlin.source, cost=D("0.25"),
                        timestamp=datetime(2026, 3, 10, tzinfo=UTC))
    f.UsageEventFactory(tenant=berlin.tenant, source=berlin.source, cost=D("0.0500000001"),
                        timestamp=datetime(2026, 3, 31, 21, 59, tzinfo=UTC))  # 23:59 in Berlin: March
    f.UsageEventFactory(tenant=berlin.tenant, source=berlin.source, cost=D("7"),
                        timestamp=datetime(2026, 3, 31, 22, 0, tzinfo=UTC))  # April in Berlin
    f.UsageEventFactory(tenant=berlin.tenant, cost=D("5"), timestamp=datetime(2026, 3, 10, tzinfo=UTC))  # other source

    with time_machine.travel(datetime(2026, 3, 20, 12, tzinfo=UTC), tick=False):
        data = get(client, berlin.secret).json()["data"]

    assert data == [{
        "id": budget.id, "object": "budget", "name": "src-monthly", "budget_id": None, "scope": "source",
        "scope_value": berlin.source.name, "end_user": None, "period": "monthly", "enforcement": "hard",
        "currency": "USD",
        # admission's counters are whole micro-dollars, rounded up (never below the ledger)
        "limit_usd": "1", "spent_usd": "0.300001", "held_usd": "0",
        "remaining_usd": "0.699999", "period_start": "2026-03-01T00:00:00+01:00",
        "resets_at": "2026-04-01T00:00:00+02:00", "timezone": "Europe/Berlin",
    }]


def test_remaining_never_goes_negative_and_total_never_resets(client, berlin):
    f.BudgetFactory(tenant=berlin.tenant, name="lifetime", limit_usd=D("0.10"), period="total", enforcement="soft")
    f.UsageEventFactory(tenant=berlin.tenant, cost=D("0.25"), timestamp=datetime(2024, 1, 1, tzinfo=UTC))

    (item,) = get(client, berlin.secret).json()["data"]

    assert (item["spent_usd"], item["remaining_usd"]) == ("0.25", "0")
    assert (item["period_start"], item["resets_at"]) == (None, None)


def test_needs_a_valid_key(client, berlin):
    resp = get(client, "sk-wrong")

    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_the_same_numbers_for_the_admin_and_the_management_api(berlin):
    from apps.billing.budgets import budget_statuses_sync
    from apps.billing.models import Budget

    f.BudgetFactory(tenant=berlin.tenant, name="t", limit_usd=D("2"))
    f.UsageEventFactory(tenant=berlin.tenant, cost=D("0.5"))

    (status,) = budget_statuses_sync(budgets=Budget.objects.filter(tenant=berlin.tenant))

    assert (status.spent_usd, status.remaining_usd) == (D("0.5"), D("1.5"))


def test_ledger_spend_follows_each_scope(berlin):
    from apps.analytics.selectors import ledger_cost_sums
    from apps.billing.periods import EPOCH

    t = berlin.tenant
    other_key = f.ApiKeyFactory(tenant=t, source=berlin.source)
    f.UsageEventFactory(tenant=t, source=berlin.source, api_key=berlin.key, budget_id="team-red", cost=D("1"))
    f.UsageEventFactory(tenant=t, source=berlin.source, api_key=other_key, budget_id="", cost=D("2"))
    f.UsageEventFactory(tenant=t, api_key=other_key, budget_id="team-red", cost=D("4"))
    f.UsageEventFactory(cost=D("8"))  # another tenant

    def spent(scope, value=""):
        budget = f.BudgetFactory(tenant=t, scope=scope, scope_value=value, period="total")
        return ledger_cost_sums(items=[(budget.id, t.id, scope, value, EPOCH, None)])[budget.id]

    assert spent("tenant") == D("7")
    assert spent("source", berlin.source.name) == D("3")
    assert spent("key", berlin.key.name) == D("1")
    assert spent("budget_id", "team-red") == D("5")


def test_a_budget_id_budget_shows_the_string_a_client_sends(client, berlin):
    """`GET /v1/budget` names each budget_id budget by the value to send as metadata.budget_id (the
    integer `id` is not it: sending it back was a 400)."""
    f.BudgetFactory(tenant=berlin.tenant, name="red team", scope="budget_id", scope_value="team-red")
    berlin.key.default_budget_id = "team-red"
    berlin.key.save()

    (item,) = [b for b in get(client, berlin.secret).json()["data"] if b["scope"] == "budget_id"]

    assert item["budget_id"] == "team-red"
    ok = client.post("/v1/chat/completions", content_type="application/json",
                     HTTP_AUTHORIZATION=f"Bearer {berlin.secret}",
                     data={"model": "nope", "messages": [{"role": "user", "content": "x"}],
                           "metadata": {"budget_id": item["budget_id"]}})
    assert ok.json()["error"]["code"] == "model_not_found"  # the budget id was accepted; the model is not
