"""The ASGI entry point: /v1 runs on the lean data-plane handler, everything else on Django's."""

import httpx
import orjson
import pytest

from apps.analytics.models import UsageEvent
from apps.gateway import api, http
from apps.gateway import asgi as direct


@pytest.mark.parametrize("direct", [True, False], ids=["direct-routes", "lean-handler"])
def test_v1_runs_without_sessions_csrf_or_frame_options(live_gateway, live_setup, settings, direct):
    settings.GATEWAY_DIRECT_ROUTES = direct
    resp = httpx.post(f"{live_gateway}/v1/chat/completions", headers={"authorization": f"Bearer {live_setup.secret}"},
                      json={"model": live_setup.alias, "messages": [{"role": "user", "content": "hi"}]})

    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "Echo: hi"
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in resp.headers
    assert "x-frame-options" not in resp.headers
    assert UsageEvent.objects.get().request_id == resp.headers["x-request-id"]


def test_model_calls_skip_django_unless_they_carry_a_query_string():
    def scope(path, method="POST", query=b""):
        return {"type": "http", "method": method, "path": path, "query_string": query, "root_path": ""}

    assert direct.view_for(scope("/v1/chat/completions")) is api.chat_completions
    assert direct.view_for(scope("/v1/messages")) is api.messages
    assert direct.view_for(scope("/v1/chat/completions", query=b"x=\x00")) is None  # Django checks it
    assert direct.view_for(scope("/v1/chat/completions", method="GET")) is None  # Django's 405
    assert direct.view_for(scope("/v1/models", method="GET")) is None


def test_a_query_string_takes_the_lean_handler_with_its_checks(live_gateway, live_setup):
    auth = {"authorization": f"Bearer {live_setup.secret}"}
    body = {"model": live_setup.alias, "messages": [{"role": "user", "content": "hi"}]}

    assert httpx.post(f"{live_gateway}/v1/chat/completions?api-version=1", headers=auth, json=body).status_code == 200
    refused = httpx.post(f"{live_gateway}/v1/chat/completions?x=%00", headers=auth, json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_characters"


def test_other_paths_keep_the_full_middleware_stack(live_gateway):
    resp = httpx.get(f"{live_gateway}/admin/login/")

    assert resp.status_code == 200
    assert resp.headers["x-frame-options"] == "DENY"
    assert "csrftoken" in resp.headers.get("set-cookie", "")


def test_unknown_v1_path_answers_in_openai_shape(live_gateway):
    resp = httpx.get(f"{live_gateway}/v1/nothing-here")

    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "unknown_url"
    assert resp.headers["x-request-id"]


@pytest.fixture(params=["native", "aiohttp", "httpx-aiohttp", "httpx"])
def transport(request, settings):
    settings.GATEWAY_HTTP_TRANSPORT = request.param
    http._clients.clear()
    yield request.param
    http._clients.clear()


@pytest.mark.django_db
def test_every_transport_relays_answers_and_maps_upstream_errors(client, setup, transport):
    def post(model_alias):
        return client.post("/v1/chat/completions", content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {setup.secret}",
                           data=orjson.dumps({"model": model_alias, "messages": [{"role": "user", "content": "yo"}]}))

    assert post(setup.alias).json()["choices"][0]["message"]["content"] == "Echo: yo"

    setup.deployment.upstream_model = "fail-429"
    setup.deployment.save()
    from apps.gateway import selectors

    selectors.routing_table_invalidate()
    limited = post(setup.alias)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "upstream_rate_limited"
    assert limited["retry-after"]


def test_wrong_method_answers_405_in_openai_shape(live_gateway, live_setup):
    auth = {"authorization": f"Bearer {live_setup.secret}"}
    resp = httpx.get(f"{live_gateway}/v1/chat/completions", headers=auth)

    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"
    assert resp.headers["allow"] == "POST"
    assert resp.headers["x-request-id"]
    assert httpx.delete(f"{live_gateway}/v1/models", headers=auth).json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_answers_413_in_openai_shape(live_gateway, live_setup, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    big = {"model": live_setup.alias, "messages": [{"role": "user", "content": "a" * 2000}]}
    resp = httpx.post(f"{live_gateway}/v1/chat/completions", headers={"authorization": f"Bearer {live_setup.secret}"},
                      json=big)

    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    assert resp.headers["x-request-id"]
