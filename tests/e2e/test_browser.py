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
