"""Browser tests: Playwright for Python driving the distribution's Chromium (/usr/bin/chromium,
never a downloaded browser) against the real ASGI app under uvicorn. Screenshots go to
test-artifacts/ (kept by CI as artifacts, ignored by git)."""

from __future__ import annotations

import csv
import io
import os
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from apps.analytics.services import usage_rollup_recompute
from apps.keys import crypto
from apps.keys.models import ApiKey
from tests import factories as f
from tests.keys.personas import make_world

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(settings.BASE_DIR) / "test-artifacts"
PASSWORD = "pw-12345678"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (.ci/setup-extra)")


@pytest.fixture
def browser(monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the test's ORM calls are still sync.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser, live_gateway):
    context = browser.new_context(base_url=live_gateway, accept_downloads=True, viewport={"width": 1400,
                                                                                          "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    yield pg
    context.close()


@pytest.fixture
def world_with_usage(live_gateway):
    world = make_world()
    now = timezone.now()
    for i, (model, cost) in enumerate([("gpt-4o-mini", "0.20"), ("gpt-4o-mini", "0.30"), ("claude-3-5-haiku", "1.10")]):
        f.UsageEventFactory(tenant=world.acme, api_key=world.acme_key, source=world.acme_source,
                            source_ref="acme-bot", model=model, cost=Decimal(cost), provider="mock",
                            timestamp=now - timedelta(hours=i))
    f.UsageEventFactory(tenant=world.globex, api_key=world.globex_key, source_ref="globex-etl",
                        model="globex-only-model", cost=Decimal("5"), timestamp=now)
    usage_rollup_recompute(since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    return world


def login(page, username, path="/accounts/login/"):
    page.goto(path)
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit], input[type=submit]")


def chart_points(page, canvas_id) -> list:
    return page.evaluate(f"() => Chart.getChart(document.getElementById('{canvas_id}')).data.datasets[0].data")


def test_manager_reads_dashboard_filters_and_downloads_csv(page, world_with_usage):
    console_errors = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    login(page, "max-manager")
    page.wait_for_url(re.compile(r"/dashboard/$"))
    page.wait_for_function("() => window.Chart && Chart.getChart(document.getElementById('chart-series'))")
    assert page.text_content("#total-requests").strip() == "3"
    assert sum(chart_points(page, "chart-series")) == pytest.approx(1.6)
    assert len(chart_points(page, "chart-series")) == 7  # every day of the default week, empty days as 0
    box = page.locator("#chart-series").bounding_box()
    assert box["width"] > 100
    assert box["height"] > 100
    page.screenshot(path=str(ARTIFACTS / "dashboard-manager.png"), full_page=True)
    assert console_errors == []  # no failed resource (e.g. /favicon.ico), no script error

    page.select_option("#id_model", "gpt-4o-mini")
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r"model=gpt-4o-mini"))
    page.wait_for_function("() => window.Chart && Chart.getChart(document.getElementById('chart-model'))")
    assert page.text_content("#total-requests").strip() == "2"
    assert chart_points(page, "chart-model") == [0.5]
    page.screenshot(path=str(ARTIFACTS / "dashboard-filtered.png"), full_page=True)

    with page.expect_download() as info:
        page.click("#export-csv")
    download = info.value
    assert download.suggested_filename.endswith(".csv")
    rows = list(csv.reader(io.StringIO(Path(download.path()).read_text())))
    assert rows[0][:3] == ["request_id", "timestamp", "tenant"]
    assert len(rows) == 3
    assert {r[7] for r in rows[1:]} == {"gpt-4o-mini"}
    assert {r[2] for r in rows[1:]} == {"acme"}


def test_tenant_admin_creates_key_in_admin_and_sees_secret_once(page, world_with_usage):
    login(page, "ada-admin", "/admin/login/?next=/admin/keys/apikey/add/")
    page.wait_for_url(re.compile(r"/admin/keys/apikey/add/"))
    tenant_options = page.locator("#id_tenant option").all_text_contents()
    assert "globex" not in " ".join(tenant_options)
    assert "globex-etl" not in " ".join(page.locator("#id_source option").all_text_contents())
    page.select_option("#id_tenant", str(world_with_usage.acme.pk))
    page.select_option("#id_source", str(world_with_usage.acme_source.pk))
    page.fill("#id_name", "browser-key")
    page.click("input[name=_save]")
    secret = page.text_content("#api-key-secret").strip()
    page.screenshot(path=str(ARTIFACTS / "admin-key-secret-once.png"), full_page=True)
    assert secret.startswith(crypto.API_KEY_PREFIX)
    key = ApiKey.objects.get(name="browser-key")
    assert key.digest == crypto.api_key_digest(secret)

    page.click("td a:text('browser-key')")
    page.wait_for_url(re.compile(rf"/admin/keys/apikey/{key.pk}/change/"))
    assert secret not in page.content()
    page.goto("/admin/keys/apikey/")
    assert "browser-key" in page.content()
    assert secret not in page.content()


def test_manager_of_another_tenant_sees_none_of_it(page, world_with_usage):
    login(page, "gil-manager")
    page.wait_for_url(re.compile(r"/dashboard/$"))
    page.wait_for_function("() => window.Chart && Chart.getChart(document.getElementById('chart-series'))")
    html = page.content()
    page.screenshot(path=str(ARTIFACTS / "dashboard-other-tenant.png"), full_page=True)
    assert page.text_content("#total-requests").strip() == "1"
    for leak in ("acme", "gpt-4o-mini", "claude-3-5-haiku"):
        assert leak not in html
    body = page.request.get("/dashboard/usage.csv").text()
    assert "acme" not in body
    assert "globex-only-model" in body
    page.goto("/admin/keys/apikey/")
    assert "acme-key" not in page.content()
    assert "globex-key" in page.content()
    page.goto(f"/admin/keys/apikey/{world_with_usage.acme_key.pk}/change/")
    assert "acme-key" not in page.content()
    api = page.request.get("/api/keys/").json()
    assert [k["name"] for k in api["results"]] == ["globex-key"]


def test_manager_signs_in_with_sso_and_lands_on_the_tenants_dashboard(page, world_with_usage, sso_provider,
                                                                      settings):
    # Password login off: the page offers SSO only; the fake provider logs in a manager of acme.
    settings.PASSWORD_LOGIN_ENABLED = False
    settings.AUTHENTICATION_BACKENDS = ["apps.keys.sso.TenantOIDCBackend"]
    sso_provider.claims = {"sub": "idp-sam", "email": "sam@acme.test", "email_verified": True,
                           "preferred_username": "sam", "groups": ["acme:manager", "unknown-tenant:admin"]}

    page.goto("/dashboard/")
    page.wait_for_url(re.compile(r"/accounts/login/"))
    assert page.locator("#id_password").count() == 0
    page.screenshot(path=str(ARTIFACTS / "login-sso-only.png"))
    page.click("text=Sign in with SSO")
    page.wait_for_url(re.compile(r"/dashboard/$"))
    page.wait_for_function("() => window.Chart && Chart.getChart(document.getElementById('chart-series'))")
    page.screenshot(path=str(ARTIFACTS / "dashboard-after-sso.png"), full_page=True)

    assert page.text_content(".who").strip() == "sam"
    assert page.text_content("#total-requests").strip() == "3"
    html = page.content()
    for leak in ("globex", "Globex", "globex-only-model"):
        assert leak not in html
    assert any(r["path"] == "/token" for r in sso_provider.requests)  # the code was exchanged


# --- the pages people use most, at 1280 and 1920 px (issue 17) ----------------------------------

WIDTHS = (1280, 1920)


def _console_watch(page) -> list[str]:
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(f"{msg.type}: {msg.text}") if msg.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    return problems


def _shoot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}-{page.viewport_size['width']}.png"), full_page=True)


@pytest.fixture
def world_with_batches_and_budget(world_with_usage):
    now = timezone.now()
    for i in range(3):
        f.UsageEventFactory(tenant=world_with_usage.acme, api_key=world_with_usage.acme_key, source_ref="acme-bot",
                            model="gpt-4o-mini", cost=Decimal("0.05"), provider="mock", batch_id="nightly-42",
                            latency_ms=150 + 50 * i, timestamp=now - timedelta(minutes=10 + i))
    world_with_usage.acme_budget.limit_usd = Decimal("5")
    world_with_usage.acme_budget.alert_thresholds = [0.5, 0.8, 1.0]
    world_with_usage.acme_budget.save()
    usage_rollup_recompute(since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    return world_with_usage


@pytest.mark.parametrize("width", WIDTHS)
def test_dashboard_pages_explain_their_numbers(browser, live_gateway, world_with_batches_and_budget, width):
    context = browser.new_context(base_url=live_gateway, viewport={"width": width, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems = _console_watch(page)
    login(page, "max-manager")
    page.wait_for_url(re.compile(r"/dashboard/$"))
    page.wait_for_function("() => window.Chart && Chart.getChart(document.getElementById('chart-model'))")

    # doughnuts: legends with amounts and shares, tooltips too; the requests line above the bars
    legend = page.evaluate("""() => { const c = Chart.getChart(document.getElementById('chart-model'));
        return c.options.plugins.legend.labels.generateLabels(c).map(i => i.text); }""")
    assert any("$" in t and "%" in t for t in legend), legend
    tooltip = page.evaluate("""() => { const c = Chart.getChart(document.getElementById('chart-model'));
        return c.options.plugins.tooltip.callbacks.label({label: 'x', parsed: 0.5}); }""")
    assert "$0.50" in tooltip and "%" in tooltip
    orders = page.evaluate("""() => Chart.getChart(document.getElementById('chart-series')).data.datasets
        .map(d => [d.label, d.order])""")
    assert dict(orders)["Requests"] < dict(orders)["Spend (USD)"]  # the lower order is drawn on top
    assert "Figures updated" in page.text_content("#rollup-updated")
    assert page.locator("#latency-model td", has_text="gpt-4o-mini").count() == 1
    _shoot(page, "dashboard")

    page.click("#rollup-updated a")
    page.wait_for_url(re.compile(r"/dashboard/batches/"))
    assert "nightly-42" in page.text_content("#batches")
    _shoot(page, "dashboard-batches")

    page.goto(f"/dashboard/budgets/{world_with_batches_and_budget.acme_budget.pk}/")
    page.wait_for_function("() => window.Chart && Chart.getChart(document.getElementById('chart-burndown'))")
    labels = page.evaluate("() => Chart.getChart(document.getElementById('chart-burndown')).data.datasets"
                           ".map(d => d.label)")
    assert labels[:2] == ["Spent (cumulative)", "Forecast (average pace)"] and labels[2].startswith("Limit $5.00")
    _shoot(page, "dashboard-budget")
    assert problems == []
    context.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_admin_pages_without_json_boxes(browser, live_gateway, world_with_batches_and_budget, width):
    context = browser.new_context(base_url=live_gateway, viewport={"width": width, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems = _console_watch(page)
    login(page, "ada-admin", "/admin/login/?next=/admin/")
    page.wait_for_url(re.compile(r"/admin/$"))
    assert "LLM Service" in page.text_content("#site-name")
    _shoot(page, "admin-index")

    # a key with two allowed endpoints, no JSON typed
    page.goto("/admin/keys/apikey/add/")
    assert page.locator("textarea[name=allowed_endpoints]").count() == 0
    assert page.locator("#id_cache_enabled option").all_text_contents()[0] == "Tenant default"
    page.select_option("#id_tenant", str(world_with_batches_and_budget.acme.pk))
    page.select_option("#id_source", str(world_with_batches_and_budget.acme_source.pk))
    page.fill("#id_name", f"two-endpoints-{width}")
    page.check("input[name=allowed_endpoints][value='/v1/chat/completions']")
    page.check("input[name=allowed_endpoints][value='/v1/embeddings']")
    _shoot(page, "admin-key-add")
    page.click("input[name=_save]")
    page.wait_for_selector("#api-key-secret")
    assert ApiKey.objects.get(name=f"two-endpoints-{width}").allowed_endpoints == [
        "/v1/chat/completions", "/v1/embeddings"]

    # a budget with thresholds as percentages and an e-mail list
    page.goto(f"/admin/billing/budget/{world_with_batches_and_budget.acme_budget.pk}/change/")
    assert page.input_value("#id_alert_thresholds") == "50, 80, 100"
    assert page.input_value("#id_limit_usd") == "5"
    page.fill("#id_alert_emails", "ann@acme.test\nops@acme.test")
    _shoot(page, "admin-budget-change")
    page.click("input[name=_save]")
    page.wait_for_url(re.compile(r"/admin/billing/budget/$"))
    # the budget list at this width: held, remaining and resets at without horizontal scrolling
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    headers = " ".join(page.locator("#result_list thead th").all_text_contents()).lower()
    for column in ("held", "remaining", "resets at"):
        assert column in headers
    _shoot(page, "admin-budget-list")

    page.goto("/admin/keys/managementtoken/add/")
    _shoot(page, "admin-token-add")
    assert problems == []
    context.close()


def test_budget_list_fits_1400px(browser, live_gateway, world_with_batches_and_budget):
    context = browser.new_context(base_url=live_gateway, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    login(page, "ada-admin", "/admin/login/?next=/admin/billing/budget/")
    page.wait_for_url(re.compile(r"/admin/billing/budget/$"))
    page.screenshot(path=str(ARTIFACTS / "admin-budget-list-1400.png"), full_page=True)
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate("() => document.querySelector('#changelist-form .results').scrollWidth"
                         " <= document.querySelector('#changelist-form .results').clientWidth")
    context.close()
