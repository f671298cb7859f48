"""Dashboards and CSV exports: what a manager reads, and nothing of another tenant."""

import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from apps.analytics.selectors import CSV_COLUMNS
from apps.analytics.services import usage_rollup_recompute
from tests import factories as f

pytestmark = pytest.mark.django_db


def _attempt(provider, outcome, status=200):
    return {"deployment_id": 1, "provider": provider, "model": "m", "outcome": outcome, "status": status,
            "error": "", "start_ms": 1.0, "latency_ms": 100.0}


@pytest.fixture
def usage(world):
    now = timezone.now()
    for i in range(3):
        f.UsageEventFactory(tenant=world.acme, api_key=world.acme_key, source=world.acme_source,
                            source_ref="acme-bot", model="gpt-4o-mini", cost=Decimal("0.25"),
                            timestamp=now - timedelta(minutes=i), provider="openai", latency_ms=120,
                            attempts=[_attempt("openai", "ok")])
    f.UsageEventFactory(tenant=world.acme, api_key=world.acme_key, source_ref="acme-bot", model="claude-3-5-haiku",
                        cost=Decimal("1.5"), timestamp=now - timedelta(days=2), status=502, provider="anthropic",
                        attempts=[_attempt("anthropic", "error", status=500)])
    f.UsageEventFactory(tenant=world.globex, api_key=world.globex_key, source_ref="globex-etl",
                        model="globex-secret-model", cost=Decimal("99"), timestamp=now)
    usage_rollup_recompute(since=now - timedelta(days=3), until=now + timedelta(minutes=1))
    return world


def rows(resp):
    body = b"".join(resp.streaming_content).decode()
    return list(csv.reader(io.StringIO(body)))


def test_dashboard_requires_login(client):
    resp = client.get("/dashboard/")
    assert resp.status_code == 302
    assert resp["Location"].startswith("/accounts/login/")


def test_login_page_renders_and_logs_in(client, world):
    assert b"Log in" in client.get("/accounts/login/").content
    resp = client.post("/accounts/login/", {"username": "max-manager", "password": "pw-12345678"})
    assert resp.status_code == 302
    assert resp["Location"] == "/dashboard/"


def test_manager_sees_own_tenants_spend(client, usage):
    client.force_login(usage.acme_manager)
    resp = client.get("/dashboard/")
    html = resp.content.decode()
    assert resp.status_code == 200
    assert resp.context["data"]["totals"]["cost"] == Decimal("2.25")
    assert resp.context["data"]["totals"]["requests"] == 4
    assert "globex" not in html
    assert "acme-monthly" in html  # the budget table
    assert 'id="chart-series"' in html
    assert "vendor/chartjs/chart.umd.min.js" in html
    table = html.split('id="budgets"')[1].split("</table>")[0]
    assert "acme-monthly" in table and "globex" not in table
    providers = {p["provider"]: p for p in resp.context["data"]["providers"]}
    assert providers["anthropic"]["availability"] == 0.0
    assert providers["openai"]["availability"] == 1.0


def test_dashboard_filters_by_model_and_source(client, usage):
    client.force_login(usage.acme_manager)
    totals = client.get("/dashboard/", {"model": "claude-3-5-haiku"}).context["data"]["totals"]
    assert totals["cost"] == Decimal("1.5")
    assert totals["error_rate"] == 1.0
    assert client.get("/dashboard/", {"source": "nope"}).context["data"]["totals"]["requests"] == 0


def test_a_blank_model_in_the_ledger_is_not_a_filter_choice(client, usage):
    # A batch line that was not JSON is in the ledger without a model: "all" stays the selected choice.
    now = timezone.now()
    f.UsageEventFactory(tenant=usage.acme, api_key=usage.acme_key, model="", status=400, timestamp=now)
    usage_rollup_recompute(since=now - timedelta(hours=1), until=now + timedelta(minutes=1))
    client.force_login(usage.acme_manager)

    resp = client.get("/dashboard/")

    assert resp.context["choices"]["models"] == ["claude-3-5-haiku", "gpt-4o-mini"]
    model_select = resp.content.decode().split('id="id_model">')[1].split("</select>")[0]
    assert model_select.count('value=""') == 1  # only "all"


def test_foreign_tenant_filter_selects_nothing(client, usage):
    client.force_login(usage.acme_manager)
    resp = client.get("/dashboard/", {"tenant": "globex"})
    assert resp.context["data"]["totals"]["requests"] == 0
    assert 'id="budgets"' not in resp.content.decode()  # "No budgets."


def test_other_tenants_manager_sees_none_of_it(client, usage):
    client.force_login(usage.globex_manager)
    resp = client.get("/dashboard/")
    assert resp.context["data"]["totals"]["cost"] == Decimal("99")
    assert "acme" not in resp.content.decode()
    body = rows(client.get("/dashboard/usage.csv"))
    assert {r[2] for r in body[1:]} == {"globex"}


def test_user_without_tenant_sees_an_empty_dashboard(client, usage):
    client.force_login(f.UserFactory(username="loner"))
    resp = client.get("/dashboard/")
    assert resp.status_code == 200
    assert b"not a member of any tenant" in resp.content
    assert client.get("/dashboard/usage.csv").status_code == 404


def test_usage_csv_has_the_architecture_columns_and_filters(client, usage):
    client.force_login(usage.acme_manager)
    resp = client.get("/dashboard/usage.csv", {"model": "gpt-4o-mini"})
    assert resp["Content-Type"].startswith("text/csv")
    assert "attachment" in resp["Content-Disposition"]
    body = rows(resp)
    assert body[0] == CSV_COLUMNS
    assert len(body) == 4
    assert {r[2] for r in body[1:]} == {"acme"}
    assert {r[7] for r in body[1:]} == {"gpt-4o-mini"}
    assert rows(client.get("/dashboard/usage.csv", {"tenant": "globex"}))[1:] == []


def test_viewers_cannot_export(client, usage):
    client.force_login(usage.acme_viewer)
    assert client.get("/dashboard/").status_code == 200
    assert client.get("/dashboard/usage.csv").status_code == 404


def test_aggregated_csv_per_day_and_model_and_per_source(client, usage):
    client.force_login(usage.acme_manager)
    per_day = rows(client.get("/dashboard/usage-summary.csv", {"group": "day_model"}))
    assert per_day[0][:3] == ["day", "tenant", "model"]
    assert {r[2] for r in per_day[1:]} == {"gpt-4o-mini", "claude-3-5-haiku"}
    per_source = rows(client.get("/dashboard/usage-summary.csv", {"group": "source"}))
    assert per_source[0][:3] == ["tenant", "source_type", "source_id"]
    assert [(r[0], r[2], Decimal(r[8])) for r in per_source[1:]] == [("acme", "acme-bot", Decimal("2.25"))]
    assert per_source[1][8] == "2.25"  # money as a plain decimal, the same on SQLite and PostgreSQL


def test_bad_filters_are_a_400(client, usage):
    client.force_login(usage.acme_manager)
    assert client.get("/dashboard/", {"since": "2026-02-02", "until": "2026-01-01"}).status_code == 400
    assert client.get("/dashboard/usage.csv", {"since": "yesterday"}).status_code == 400
    assert client.get("/dashboard/usage-summary.csv", {"group": "x"}).status_code == 400


def test_dashboard_reads_rollups_not_the_ledger(client, usage, django_assert_max_num_queries):
    """Charts read rollups; budgets read their counters (rebuilt from the ledger once, when missing)."""
    client.force_login(usage.acme_manager)
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get("/dashboard/")  # the budget counters exist from here on
    with CaptureQueriesContext(connection) as ctx:
        client.get("/dashboard/")
    assert not [q for q in ctx.captured_queries if "analytics_usageevent" in q["sql"]]
