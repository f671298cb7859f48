"""Exports and static files under the real ASGI server (uvicorn): the CSV streams through an async
iterator there, and /static/ is served by the app itself."""

from datetime import timedelta
from decimal import Decimal

import httpx
from django.conf import settings
from django.test import Client
from django.utils import timezone

from apps.analytics.selectors import CSV_COLUMNS
from tests import factories as f
from tests.keys.personas import make_world


def test_usage_csv_streams_under_uvicorn_scoped_to_the_user(live_gateway):
    world = make_world()
    now = timezone.now()
    for i in range(2500):  # more than one batch of the async iterator
        f.UsageEventFactory(tenant=world.acme, source_ref="acme-bot", timestamp=now - timedelta(seconds=i),
                            cost=Decimal("0.001"))
    f.UsageEventFactory(tenant=world.globex, source_ref="globex-etl", timestamp=now)
    client = Client()
    client.force_login(world.acme_manager)
    cookies = {settings.SESSION_COOKIE_NAME: client.cookies[settings.SESSION_COOKIE_NAME].value}
    with httpx.stream("GET", f"{live_gateway}/dashboard/usage.csv", cookies=cookies, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/csv")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[0].split(",") == CSV_COLUMNS
    assert len(lines) == 2501
    assert all(",acme," in line for line in lines[1:])


def test_static_files_under_uvicorn(live_gateway):
    js = httpx.get(f"{live_gateway}/static/vendor/chartjs/chart.umd.min.js")
    assert js.status_code == 200
    assert "Chart.js v4" in js.text[:200]
    assert httpx.get(f"{live_gateway}/static/dashboard/dashboard.js").status_code == 200
    assert httpx.get(f"{live_gateway}/static/nope.js").status_code == 404
