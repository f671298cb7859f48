"""Bad input on /api/ is a 4xx with the API's error shape, never a 500: huge pagination values,
control characters anywhere (URL, query, body), deletes blocked by protected rows."""

import pytest
from rest_framework.test import APIClient

from apps.keys.models import Source, Tenant
from tests import factories as f

pytestmark = pytest.mark.django_db

LISTS = ["/api/tenants/", "/api/members/", "/api/sources/", "/api/keys/", "/api/budgets/", "/api/models/",
         "/api/deployments/", "/api/prices/", "/api/audit-log/", "/api/alerts/", "/api/usage-events/"]


def api(user) -> APIClient:
    c = APIClient(raise_request_exception=False)
    c.force_authenticate(user)
    return c


@pytest.mark.parametrize("url", LISTS)
@pytest.mark.parametrize("param", ["limit", "offset"])
def test_huge_limit_or_offset_is_not_a_500(world, url, param):
    for value in (2**63, 2**64 + 7, 10**30):
        resp = api(world.root).get(url, {param: value})
        assert resp.status_code in (200, 400), (url, param, value, resp.status_code)
        if resp.status_code == 400:
            assert param in resp.json()


def test_huge_limit_is_clamped(world):
    for i in range(3):
        f.SourceFactory(tenant=world.acme, name=f"s{i}")
    resp = api(world.root).get("/api/sources/", {"limit": 2**63})
    assert resp.status_code == 200
    assert len(resp.json()["results"]) == Source.objects.count()


@pytest.mark.parametrize(("method", "url", "body"), [
    ("get", "/api/tenants/ac\x00me/", None),
    ("patch", "/api/tenants/ac\x00me/", {"name": "x"}),
    ("get", "/api/tenants/?search=\x00", None),
    ("get", "/api/usage-events/?source=a\x00b", None),
    ("get", "/api/analytics/aggregate/?model=\x01", None),
    ("post", "/api/sources/", {"tenant": "acme", "name": "bot\x00", "type": "application"}),
    ("post", "/api/budgets/", {"tenant": "acme", "name": "b", "limit_usd": "1", "period": "monthly",
                               "enforcement": "hard", "alert_emails": ["a\x00@x.test"]}),
    ("patch", "/api/tenants/acme/", {"name": "Acme\x00"}),
    ("patch", "/api/tenants/acme/", {"allowed_regions": ["eu\x1b"]}),
    ("post", "/api/members/", {"tenant": "acme", "username": "nul\x00user"}),
    ("post", "/api/keys/", {"tenant": "acme", "source": 1, "name": "k", "allowed_models": {"\x00": 1}}),
])
def test_control_characters_are_a_400_before_the_database(world, method, url, body):
    resp = getattr(api(world.acme_admin), method)(url, body, format="json")
    assert resp.status_code == 400, resp.content
    assert "Control characters" in resp.json()["detail"]


def test_control_characters_in_a_form_body_are_a_400(world):
    resp = api(world.acme_admin).post("/api/sources/", {"tenant": "acme", "name": "bot\x00"})
    assert resp.status_code == 400
    assert "Control characters" in resp.json()["detail"]


def test_free_text_keeps_tabs_and_newlines(world):
    resp = api(world.acme_admin).post("/api/sources/", {"tenant": "acme", "name": "a\tb", "type": "service"},
                                      format="json")
    assert resp.status_code == 201, resp.content


def test_deleting_a_source_with_keys_is_a_409_naming_the_blocker(world):
    resp = api(world.acme_admin).delete(f"/api/sources/{world.acme_source.pk}/")
    assert resp.status_code == 409, resp.content
    assert resp.json()["blocked_by"] == {"apikey": 1}
    assert Source.objects.filter(pk=world.acme_source.pk).exists()


def test_deleting_a_tenant_with_ledger_rows_is_a_409_naming_the_blocker(world):
    f.UsageEventFactory(tenant=world.acme, api_key=world.acme_key)
    resp = api(world.root).delete("/api/tenants/acme/")
    assert resp.status_code == 409, resp.content
    assert resp.json()["blocked_by"]["usageevent"] == 1
    assert Tenant.objects.filter(slug="acme").exists()


def test_unrouted_api_urls_answer_json_not_django_html(world):
    """Before: Django's HTML 404 page for a URL no route matches (e.g. a non-integer id)."""
    resp = api(world.acme_admin).get("/api/budgets/1.5/")
    assert resp.status_code == 404
    assert resp["Content-Type"] == "application/json"
    assert resp.json() == {"detail": "Not found."}


def test_a_body_over_the_upload_limit_is_a_json_413(world, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    resp = api(world.acme_admin).post("/api/sources/", {"tenant": "acme", "name": "x" * 500}, format="json")
    assert resp.status_code == 413
    assert resp.json() == {"detail": "Request body too large."}
