"""The dashboard explains itself: a "last updated" stamp, latency per model and provider, a batch
page, and a page per budget with its burn-down and forecast (numbers from the one budget read)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.utils import timezone

from apps.analytics.services import usage_rollup_recompute
from apps.billing.budgets import budget_statuses_sync
from apps.billing.models import Budget
from apps.core.money import usd_display
from tests import factories as f

pytestmark = pytest.mark.django_db


@pytest.fixture
def usage(world):
    now = timezone.now()
    for i, (model, provider, latency, batch) in enumerate([
            ("gpt-4o-mini", "openai", 100, "nightly-1"), ("gpt-4o-mini", "openai", 300, "nightly-1"),
            ("claude-3-5-haiku", "anthropic", 900, ""), ("gpt-4o-mini", "openai", 120, "nightly-2")]):
        f.UsageEventFactory(tenant=world.acme, api_key=world.acme_key, source=world.acme_source, source_ref="acme-bot",
                            model=model, provider=provider, latency_ms=latency, cost=Decimal("0.25"), batch_id=batch,
                            timestamp=now - timedelta(minutes=i))
    f.UsageEventFactory(tenant=world.globex, api_key=world.globex_key, source_ref="globex-etl", batch_id="globex-batch",
                        model="globex-secret-model", cost=Decimal("99"), timestamp=now)
    usage_rollup_recompute(since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    return world


def test_dashboard_says_when_its_figures_were_updated_and_why_they_lag(client, usage):
    client.force_login(usage.acme_manager)
    html = client.get("/dashboard/").content.decode()
    stamp = re.search(r'id="rollup-updated">Figures updated (\S+ \S+) UTC', html)
    assert stamp, html[:3000]
    assert "recomputed every 60 s" in html


def test_dashboard_shows_latency_per_model_and_provider(client, usage):
    client.force_login(usage.acme_manager)
    html = client.get("/dashboard/").content.decode()
    model_table = html.split('id="latency-model"', 1)[1].split("</table>", 1)[0]
    provider_table = html.split('id="latency-provider"', 1)[1].split("</table>", 1)[0]
    assert "claude-3-5-haiku" in model_table and "gpt-4o-mini" in model_table
    assert "anthropic" in provider_table and "openai" in provider_table
    assert "globex" not in model_table
    assert re.search(r"<td>openai</td><td>3</td><td>\d+ ms</td><td>\d+ ms</td>", provider_table)


def test_budget_table_shows_a_small_limit_as_it_is_and_links_the_budget_page(client, usage):
    usage.acme_budget.limit_usd = Decimal("0.004")
    usage.acme_budget.save()
    client.force_login(usage.acme_manager)
    html = client.get("/dashboard/").content.decode()
    assert '<td class="budget-limit">$0.004</td>' in html
    assert f'href="/dashboard/budgets/{usage.acme_budget.pk}/"' in html


def test_batch_page_lists_spend_and_lines_per_batch_of_the_users_tenants(client, usage):
    client.force_login(usage.acme_manager)
    html = client.get("/dashboard/batches/").content.decode()
    table = html.split('id="batches"', 1)[1].split("</table>", 1)[0]
    assert re.search(r"<code>nightly-1</code></td><td>2</td><td>0</td><td>60</td><td>\$0.50</td>", table), table
    assert "nightly-2" in table
    assert "globex-batch" not in table


def test_budget_page_shows_the_budget_reads_numbers_a_burn_down_and_a_forecast(client, usage):
    budget = usage.acme_budget
    client.force_login(usage.acme_manager)
    resp = client.get(f"/dashboard/budgets/{budget.pk}/")
    assert resp.status_code == 200
    html = resp.content.decode()
    status = budget_statuses_sync(budgets=Budget.objects.filter(pk=budget.pk))[0]
    assert status.spent_usd == Decimal("1")
    assert f'id="budget-spent">{usd_display(status.spent_usd)}<' in html
    assert f'id="budget-remaining">{usd_display(status.remaining_usd)}<' in html
    chart = json.loads(re.search(r'<script id="burndown-data" type="application/json">(.*?)</script>', html,
                                 re.S).group(1))
    spent = [Decimal(v) for v in chart["spent"]]
    assert spent[-1] == status.spent_usd and spent == sorted(spent)
    assert chart["limit"] == str(status.limit_usd)
    forecast = [Decimal(v) for v in chart["forecast"] if v is not None]
    assert forecast[0] == status.spent_usd and forecast[-1] >= status.spent_usd  # to the period's end
    assert len(chart["labels"]) == len(chart["forecast"]) >= len(chart["spent"])
    assert 'id="budget-forecast">$' in html


def test_budget_page_of_another_tenant_is_not_found(client, usage):
    client.force_login(usage.acme_manager)
    assert client.get(f"/dashboard/budgets/{usage.globex_budget.pk}/").status_code == 404
    client.logout()
    assert client.get(f"/dashboard/budgets/{usage.acme_budget.pk}/").status_code == 302


def test_analytics_code_does_not_import_billing():
    root = Path(__file__).resolve().parents[2] / "apps" / "analytics"
    pattern = re.compile(r"^\s*(from|import) apps\.billing", re.M)
    offenders = [p.name for p in root.glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
