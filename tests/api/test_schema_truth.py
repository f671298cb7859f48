"""The OpenAPI schema at /api/schema/ says what the API does: errors, nullable fields, the price
answer, the bounds of the filters."""

import pytest
from rest_framework.test import APIClient

from apps.billing.models import Price
from apps.keys.services import audit_record

pytestmark = pytest.mark.django_db


@pytest.fixture
def schema(world):
    c = APIClient()
    c.force_authenticate(world.root)
    resp = c.get("/api/schema/", {"format": "json"})
    assert resp.status_code == 200
    return resp.json()


def api(user) -> APIClient:
    c = APIClient()
    c.force_authenticate(user)
    return c


def test_every_operation_documents_its_error_responses(schema):
    for path, item in schema["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            assert {"400", "403"} <= codes, (method, path, codes)
            if "{" in path:
                assert "404" in codes, (method, path)
            if method == "delete":
                assert "409" in codes, (method, path)


def test_audit_log_tenant_is_nullable_in_schema_and_in_fact(world, schema):
    audit_record(actor="root", action="update", object_type="price", object_id="1")  # a global change
    rows = api(world.root).get("/api/audit-log/").json()["results"]
    assert any(r["tenant"] is None for r in rows)
    assert schema["components"]["schemas"]["AuditLog"]["properties"]["tenant"].get("nullable") is True
    assert schema["components"]["schemas"]["Alert"]["properties"]["budget"].get("nullable") is True


def test_unchanged_price_answers_the_price_in_force(world):
    body = {"model": "gpt-x", "input_usd_per_mtok": "1.5", "output_usd_per_mtok": "3"}
    first = api(world.root).post("/api/prices/", body, format="json")
    assert first.status_code == 201
    again = api(world.root).post("/api/prices/", body, format="json")
    assert again.status_code == 200
    assert again.json() == first.json()  # a Price, the one in force; not {"detail": "Unchanged..."}
    assert Price.objects.filter(model="gpt-x").count() == 1


def test_since_bound_is_documented(schema):
    params = schema["paths"]["/api/usage-events/"]["get"]["parameters"]
    since = next(p for p in params if p["name"] == "since")
    assert "400 days" in since["description"]


def test_pagination_bounds_are_documented(schema):
    params = {p["name"]: p for p in schema["paths"]["/api/sources/"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 1000
    assert params["offset"]["schema"]["maximum"] == 2**63 - 1
