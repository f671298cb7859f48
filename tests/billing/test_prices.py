"""Prices: seeded from genai-prices (offline), versioned, overridden by config and admin, never
edited in place."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.utils import timezone

from apps.billing import genai, services
from apps.billing.models import Price
from apps.gateway.services import prices_sync
from apps.keys.models import AuditLog
from tests import factories as f

pytestmark = pytest.mark.django_db
D = Decimal


def alias_on(alias: str, kind: str = "mock", upstream_model: str | None = None):
    provider = f.ProviderFactory(kind=kind, api_base="http://127.0.0.1:1/v1" if kind != "mock" else "")
    return f.DeploymentFactory(alias=f.ModelAliasFactory(alias=alias), provider=provider,
                               upstream_model=upstream_model or f"up-{alias}")


def test_sync_seeds_a_known_alias_by_its_name():
    alias_on("gpt-4o-mini")

    assert prices_sync() == {"gpt-4o-mini": "created"}

    price = Price.objects.get(model="gpt-4o-mini")
    assert (price.input_usd_per_mtok, price.output_usd_per_mtok, price.cached_input_usd_per_mtok) == (
        D("0.15"), D("0.6"), D("0.075"))
    assert price.cache_write_usd_per_mtok is None
    assert price.batch_discount == D("0.5")
    assert (price.source, price.source_ref) == ("genai-prices", "openai/gpt-4o-mini")
    assert AuditLog.objects.filter(object_type="price", object_id=str(price.id), action="create").exists()


def test_sync_maps_an_alias_by_its_deployment_upstream_model():
    alias_on("fast-claude", kind="anthropic", upstream_model="claude-3-5-haiku-latest")

    prices_sync()

    price = Price.objects.get(model="fast-claude")
    assert price.source_ref == "anthropic/claude-3-5-haiku-latest"
    assert (price.input_usd_per_mtok, price.output_usd_per_mtok, price.cached_input_usd_per_mtok,
            price.cache_write_usd_per_mtok) == (D("0.8"), D("4"), D("0.08"), D("1"))


def test_sync_uses_the_provider_kind_to_disambiguate():
    alias_on("chat", kind="azure_openai", upstream_model="gpt-4o")

    prices_sync()

    assert Price.objects.get(model="chat").source_ref == "azure/gpt-4o"


def test_sync_leaves_unknown_models_unpriced():
    alias_on("house-llama", kind="openai_compatible", upstream_model="llama-local-q4")

    assert prices_sync() == {"house-llama": "unknown"}
    assert not Price.objects.filter(model="house-llama").exists()


def test_sync_is_idempotent():
    alias_on("gpt-4o")
    prices_sync()

    assert prices_sync() == {"gpt-4o": "unchanged"}
    assert Price.objects.filter(model="gpt-4o").count() == 1


def test_sync_adds_a_version_only_when_the_price_changed(monkeypatch):
    alias_on("gpt-4o")
    prices_sync(at=timezone.now() - timedelta(days=2))
    first = Price.objects.get(model="gpt-4o")
    cheaper = genai.GenaiPrice(ref="openai/gpt-4o", input_usd_per_mtok=D("2"), output_usd_per_mtok=D("8"),
                               cached_input_usd_per_mtok=D("1"), cache_write_usd_per_mtok=None,
                               batch_discount=D("0.5"))
    monkeypatch.setattr(genai, "genai_price_lookup", lambda **kw: cheaper)

    assert prices_sync() == {"gpt-4o": "created"}
    assert prices_sync() == {"gpt-4o": "unchanged"}

    versions = list(Price.objects.filter(model="gpt-4o").order_by("effective_from"))
    assert [v.input_usd_per_mtok for v in versions] == [D("2.5"), D("2")]
    old = versions[0]
    assert (old.id, old.input_usd_per_mtok, old.effective_from) == (first.id, first.input_usd_per_mtok,
                                                                     first.effective_from)


def test_sync_keeps_config_and_admin_overrides():
    alias_on("gpt-4o-mini")
    alias_on("gpt-4o")
    f.PriceFactory(model="gpt-4o-mini", input_usd_per_mtok=D("9"), source="config")
    f.PriceFactory(model="gpt-4o", input_usd_per_mtok=D("7"), source="admin")

    assert prices_sync() == {"gpt-4o": "override", "gpt-4o-mini": "override"}
    assert Price.objects.count() == 2


def test_prices_sync_command(capsys):
    alias_on("gpt-4o")

    call_command("prices_sync")

    out = capsys.readouterr().out
    assert "gpt-4o: created" in out
    assert "1 new price versions" in out


def test_demo_setup_prices_the_demo_models(capsys):
    call_command("demo_setup")
    call_command("demo_setup")

    assert Price.objects.get(model="gpt-4o").source == "genai-prices"
    assert Price.objects.get(model="gpt-4o-mini").source == "config"
    assert Price.objects.filter(model="gpt-4o").count() == 1


def test_genai_lookup_reads_tiered_prices_at_their_base_and_the_batch_discount():
    found = genai.genai_price_lookup(refs=[("claude-sonnet-4-5", "anthropic")], at=datetime(2026, 11, 1, tzinfo=UTC))

    assert (found.input_usd_per_mtok, found.output_usd_per_mtok, found.cache_write_usd_per_mtok) == (
        D("3"), D("15"), D("3.75"))
    assert found.batch_discount == D("0.5")


# --- admin ---------------------------------------------------------------------------------


def _price_form(price: Price, **changes) -> dict:
    when = changes.pop("effective_from", price.effective_from)
    data = {"model": price.model, "effective_from_0": when.strftime("%Y-%m-%d"),
            "effective_from_1": when.strftime("%H:%M:%S"), "input_usd_per_mtok": price.input_usd_per_mtok,
            "output_usd_per_mtok": price.output_usd_per_mtok, "cached_input_usd_per_mtok": "",
            "cache_write_usd_per_mtok": "", "batch_discount": price.batch_discount}
    data.update(changes)
    return data


def test_admin_change_of_a_price_adds_a_version_and_keeps_the_old_one(admin_client):
    old = f.PriceFactory(model="gpt-4o", input_usd_per_mtok=D("2.5"), output_usd_per_mtok=D("10"),
                         effective_from=timezone.now() - timedelta(days=30))

    resp = admin_client.post(f"/admin/billing/price/{old.id}/change/", _price_form(old, input_usd_per_mtok="2.25"))

    assert resp.status_code == 302
    versions = list(Price.objects.filter(model="gpt-4o").order_by("effective_from"))
    assert len(versions) == 2
    assert (versions[0].id, versions[0].input_usd_per_mtok) == (old.id, D("2.5"))
    assert (versions[1].input_usd_per_mtok, versions[1].source) == (D("2.25"), "admin")
    assert versions[1].effective_from > old.effective_from


def test_admin_add_creates_an_admin_version(admin_client):
    when = datetime(2026, 1, 1, 12, tzinfo=UTC)
    data = _price_form(Price(model="my-model", input_usd_per_mtok=D("1"), output_usd_per_mtok=D("3"),
                             batch_discount=D("0"), effective_from=when))

    resp = admin_client.post("/admin/billing/price/add/", data)

    assert resp.status_code == 302
    price = Price.objects.get(model="my-model")
    assert (price.source, price.output_usd_per_mtok) == ("admin", D("3"))


def test_admin_cannot_delete_a_price(admin_client):
    price = f.PriceFactory()

    assert admin_client.post(f"/admin/billing/price/{price.id}/delete/", {"post": "yes"}).status_code == 403
    assert Price.objects.filter(id=price.id).exists()


def test_budget_admin_lists_live_spend(admin_client):
    budget = f.BudgetFactory(name="team", limit_usd=D("3"))
    f.UsageEventFactory(tenant=budget.tenant, cost=D("1.25"))

    page = admin_client.get("/admin/billing/budget/").content.decode()

    assert "team" in page
    assert "1.25" in page  # spent
    assert "1.75" in page  # remaining


def test_budget_admin_change_is_audited(admin_client):
    budget = f.BudgetFactory(name="team", limit_usd=D("3"))
    data = {"tenant": budget.tenant_id, "name": "team", "scope": "tenant", "scope_value": "", "limit_usd": "5",
            "period": "monthly", "enforcement": "soft", "alert_thresholds": "80", "alert_emails": "",
            "alert_webhook_url": ""}

    resp = admin_client.post(f"/admin/billing/budget/{budget.id}/change/", data)

    assert resp.status_code == 302
    log = AuditLog.objects.get(object_type="budget", action="update")
    assert (log.before["limit_usd"], log.after["enforcement"]) == ("3.0000000000", "soft")


def test_alert_admin_lists_alerts(admin_client):
    alert = f.AlertFactory(message="Budget x reached 80%")

    page = admin_client.get("/admin/billing/alert/").content.decode()

    assert alert.message in page


def test_price_version_create_refuses_a_duplicate_effective_from():
    from django.core.exceptions import ValidationError

    price = f.PriceFactory()

    with pytest.raises(ValidationError):
        services.price_version_create(model=price.model, input_usd_per_mtok=D("1"), output_usd_per_mtok=D("1"),
                                      effective_from=price.effective_from, actor="t")
