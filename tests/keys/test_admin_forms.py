"""Admin forms people use daily: no raw JSON, plain labels, money as currency, a front page."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from apps.billing.models import Budget
from apps.core.money import usd_display
from apps.keys.models import ApiKey

pytestmark = pytest.mark.django_db


def login(client, user):
    client.force_login(user)
    return client


def test_key_form_has_checkboxes_for_endpoints_a_tenant_default_cache_choice_and_plain_labels(client, world):
    html = login(client, world.acme_admin).get("/admin/keys/apikey/add/").content.decode()
    assert not re.search(r'<textarea[^>]*name="allowed_endpoints"', html)
    assert 'type="checkbox" name="allowed_endpoints" value="/v1/chat/completions"' in html
    assert 'value="/v1/embeddings"' in html
    assert "Tenant default" in html and "Unknown" not in html
    for label in ("Requests per minute", "Tokens per minute", "Cache TTL (seconds)"):
        assert label in html
    for raw in (">Rpm<", ">Tpm<", "Cache ttl s"):
        assert raw not in html


def test_key_created_with_two_allowed_endpoints_without_typing_json(client, world):
    login(client, world.acme_admin)
    resp = client.post("/admin/keys/apikey/add/", {
        "tenant": world.acme.pk, "source": world.acme_source.pk, "name": "two-endpoints",
        "allowed_endpoints": ["/v1/chat/completions", "/v1/embeddings"], "cache_enabled": "unknown"})
    assert resp.status_code == 200, resp.content[:3000]
    key = ApiKey.objects.get(name="two-endpoints")
    assert key.allowed_endpoints == ["/v1/chat/completions", "/v1/embeddings"]
    assert key.cache_enabled is None


def test_key_created_with_its_own_semantic_cache_settings(client, world):
    login(client, world.acme_admin)
    resp = client.post("/admin/keys/apikey/add/", {
        "tenant": world.acme.pk, "source": world.acme_source.pk, "name": "semantic", "cache_enabled": "unknown",
        "semantic_cache_enabled": "true", "semantic_cache_embedding_alias": "text-embedding-3-small",
        "semantic_cache_threshold": "0.93"})
    assert resp.status_code == 200, resp.content[:3000]
    key = ApiKey.objects.get(name="semantic")
    assert (key.semantic_cache_enabled, key.semantic_cache_embedding_alias, key.semantic_cache_threshold) == (
        True, "text-embedding-3-small", Decimal("0.93"))

    resp = client.post("/admin/keys/apikey/add/", {
        "tenant": world.acme.pk, "source": world.acme_source.pk, "name": "too-strict", "cache_enabled": "unknown",
        "semantic_cache_enabled": "unknown", "semantic_cache_threshold": "1.5"})
    assert "Ensure this value is less than or equal to 1" in resp.content.decode()
    assert not ApiKey.objects.filter(name="too-strict").exists()


def test_budget_created_with_percent_thresholds_and_an_email_list(client, world):
    login(client, world.acme_admin)
    data = {"tenant": world.acme.pk, "name": "team", "scope": "tenant", "scope_value": "", "limit_usd": "50",
            "period": "monthly", "enforcement": "hard", "alert_thresholds": "80, 50, 100%",
            "alert_emails": "ann@acme.test\nops@acme.test", "alert_webhook_url": ""}
    resp = client.post("/admin/billing/budget/add/", data)
    assert resp.status_code == 302, resp.content[:3000]
    budget = Budget.objects.get(name="team")
    assert budget.alert_thresholds == [0.5, 0.8, 1.0]
    assert budget.alert_emails == ["ann@acme.test", "ops@acme.test"]

    page = client.get(f"/admin/billing/budget/{budget.pk}/change/").content.decode()
    assert 'value="50, 80, 100"' in page
    assert "50.0000000000" not in page and 'name="limit_usd" value="50"' in page
    assert "the metadata.budget_id clients send" in page  # scope value help

    bad = client.post("/admin/billing/budget/add/", {**data, "name": "bad", "alert_thresholds": "80, lots",
                                                     "alert_emails": "not-an-email"}).content.decode()
    assert "is not a number" in bad and "is not an e-mail address" in bad


def test_budget_list_shows_money_as_currency_with_held_remaining_and_resets(client, world):
    world.acme_budget.limit_usd = Decimal("0.05")
    world.acme_budget.save()
    html = login(client, world.acme_admin).get("/admin/billing/budget/").content.decode()
    for column in ("held", "remaining", "resets at", "applies to"):
        assert f">{column.capitalize()}<" in html or column in html.lower()
    assert "$0.05" in html
    assert "0.0500000000" not in html


@pytest.mark.parametrize(("value", "shown"), [
    ("50.0000000000", "$50.00"), ("0.0042", "$0.0042"), ("0.5", "$0.50"), ("1234.5", "$1,234.50"),
    ("0", "$0.00"), ("0.003", "$0.003"),
])
def test_usd_display(value, shown):
    assert usd_display(Decimal(value)) == shown


def test_front_page_sends_people_to_the_dashboard_or_the_login(client, world):
    resp = client.get("/")
    assert resp.status_code == 302 and resp["Location"].startswith("/accounts/login/")
    login(client, world.acme_manager)
    resp = client.get("/")
    assert resp.status_code == 302 and resp["Location"] == "/dashboard/"


def test_admin_is_branded_and_links_to_the_dashboard(client, world):
    html = login(client, world.acme_admin).get("/admin/").content.decode()
    assert "LLM Service" in html
    assert 'id="admin-dashboard-link"' in html and 'href="/dashboard/"' in html
    assert "Django administration" not in html
