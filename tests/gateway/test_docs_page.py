"""/v1/docs (django-ninja's Swagger UI) loads nothing from another host: its scripts, styles and
icons are served by the gateway itself."""

from __future__ import annotations

import re

import httpx
import pytest

pytestmark = pytest.mark.django_db

REFERENCES = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def references(html: str) -> list[str]:
    return REFERENCES.findall(html)


def test_the_docs_page_references_no_external_host(client):
    resp = client.get("/v1/docs")

    assert resp.status_code == 200
    html = resp.content.decode()
    refs = references(html)
    assert any(r.endswith("swagger-ui-bundle.js") for r in refs)
    assert all(r.startswith("/") and not r.startswith("//") for r in refs), refs
    assert "cdn" not in html.lower()
    for ref in refs:  # and the gateway serves each of them
        assert client.get(ref).status_code == 200, ref


def test_the_lean_data_plane_serves_the_same_page(live_gateway):
    resp = httpx.get(f"{live_gateway}/v1/docs")

    assert resp.status_code == 200
    assert all(r.startswith("/") and not r.startswith("//") for r in references(resp.text))
    assert httpx.get(f"{live_gateway}/v1/openapi.json").status_code == 200
