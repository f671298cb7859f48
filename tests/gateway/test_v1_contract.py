"""The /v1 contract around the views: control characters in a path or query string are a 400 before
anything reaches the database; every error, ninja's own parameter errors included, is OpenAI-shaped;
the OpenAPI document describes bodies, answers, errors and the bearer scheme; each endpoint checks
the key's endpoint scope against its own path."""

from __future__ import annotations

import httpx
import orjson
import pytest
from django.http import Http404
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError

from apps.gateway import schemas
from apps.gateway.api import api
from tests import factories as f
from tests.conftest import make_setup

ERROR_KEYS = {"message", "type", "param", "code"}

# Each of these answered 500 (PostgreSQL refuses NUL in text) before the middleware refused them.
CONTROL_URLS = [
    ("get", "/v1/files/file-%00", None),
    ("get", "/v1/files/file-%00/content", None),
    ("delete", "/v1/files/file-%00", None),
    ("get", "/v1/batches/batch_%00", None),
    ("post", "/v1/batches/batch_%00/cancel", None),
    ("get", "/v1/requests/req_%00", None),
    ("get", "/v1/files?after=%00", "after"),
    ("get", "/v1/files?purpose=ba%00tch", "purpose"),
    ("get", "/v1/batches?after=%00", "after"),
    ("get", "/v1/budget?budget_id=%00", "budget_id"),
    ("get", "/v1/budget?budget_id=team%1Fred", "budget_id"),
    ("get", "/v1/models?x%00=1", "x\x00"),
    ("post", "/v1/chat/completions?user=%7F", "user"),
    ("get", "/v1/files/%C2%85", None),  # C1 (NEL)
]


def _is_openai_error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.content
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


@pytest.mark.parametrize(("method", "url", "param"), CONTROL_URLS)
def test_control_characters_in_path_or_query_are_a_400_on_the_data_plane(live_gateway, method, url, param):
    key = f.ApiKeyFactory()

    resp = httpx.request(method, live_gateway + url, headers={"authorization": f"Bearer {key.secret}"})

    error = _is_openai_error(resp, 400)
    assert error["code"] == "invalid_characters"
    assert error["param"] == param
    assert resp.headers["x-request-id"]


@pytest.mark.django_db
def test_control_characters_are_refused_before_any_database_access(client, django_assert_num_queries):
    key = f.ApiKeyFactory()  # not in the auth cache: authenticating it would read the database

    with django_assert_num_queries(0):
        path = client.get("/v1/files/file-%00", HTTP_AUTHORIZATION=f"Bearer {key.secret}")
        query = client.get("/v1/budget?budget_id=%00", HTTP_AUTHORIZATION=f"Bearer {key.secret}")

    assert _is_openai_error(path, 400)["param"] is None
    assert _is_openai_error(query, 400)["param"] == "budget_id"


@pytest.mark.django_db
def test_plain_and_percent_encoded_printable_input_still_passes(client):
    key = f.ApiKeyFactory()

    resp = client.get("/v1/files?after=file-%C3%A9%20x&purpose=batch", HTTP_AUTHORIZATION=f"Bearer {key.secret}")

    assert resp.status_code == 200
    assert resp.json()["data"] == []


@pytest.mark.parametrize(("url", "param"), [
    ("/v1/files?limit=null", "limit"),
    ("/v1/files?limit=1.5", "limit"),
    ("/v1/batches?limit=", "limit"),
    ("/v1/batches?limit=ten", "limit"),
])
def test_ninja_parameter_errors_are_openai_shaped_400s_naming_the_param(live_gateway, url, param):
    key = f.ApiKeyFactory()

    resp = httpx.get(live_gateway + url, headers={"authorization": f"Bearer {key.secret}"})

    error = _is_openai_error(resp, 400)  # was 422 {"detail": [...]}
    assert error["param"] == param
    assert error["message"].startswith(f"Invalid value for '{param}'")


# --- the OpenAPI document ---------------------------------------------------------------------


@pytest.fixture
def document(client):
    resp = client.get("/v1/openapi.json")
    assert resp.status_code == 200
    return resp.json()


def _resolve(document: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def _body_schema(document: dict, path: str, media: str = "application/json") -> dict:
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    return _resolve(document, body["content"][media]["schema"])


def test_document_describes_request_bodies_from_the_validating_models(document):
    chat = _body_schema(document, "/v1/chat/completions")
    embeddings = _body_schema(document, "/v1/embeddings")
    seed = _body_schema(document, "/v1/requests")
    upload = _body_schema(document, "/v1/files", "multipart/form-data")
    batch = _body_schema(document, "/v1/batches")

    ours = {"metadata", "cache", "async", "batch_id", "callback_url"}
    assert set(chat["properties"]) == set(schemas.ChatBody.model_fields) | ours
    assert set(chat["required"]) == {"model", "messages"}
    assert set(embeddings["properties"]) == set(schemas.EmbeddingsBody.model_fields) | ours
    assert set(embeddings["required"]) == {"model", "input"}
    inner = seed["properties"]["request"]
    assert set(inner["properties"]) == {"model", "messages", "options", "metadata"}
    assert "async" in inner["properties"]["options"]["properties"]
    assert upload["properties"]["file"]["format"] == "binary"
    assert upload["required"] == ["file", "purpose"]
    assert set(batch["required"]) == {"input_file_id", "endpoint"}
    metadata = document["components"]["schemas"]["GatewayMetadata"]
    assert set(metadata["properties"]) == {"source_id", "source_type", "priority", "budget_id", "tags",
                                          "semantic_cache", "semantic_cache_threshold"}


def test_document_describes_answers_and_the_error_shape(document):
    error = document["components"]["schemas"]["Error"]
    detail = _resolve(document, error["properties"]["error"])
    assert set(detail["required"]) == ERROR_KEYS

    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) >= {"200", "202", "400", "401", "402", "403", "404", "429", "500", "502", "503", "504"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert _resolve(document, chat["200"]["content"]["application/json"]["schema"])["title"] == "ChatCompletion"
    for status in ("400", "401", "402", "403", "404", "429", "500"):
        assert chat[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}

    paths = document["paths"]
    for path, method in [("/v1/files/{file_id}", "get"), ("/v1/batches/{batch_id}", "get"),
                         ("/v1/requests/{request_id}", "get"), ("/v1/budget", "get"), ("/v1/models", "get"),
                         ("/v1/files", "get"), ("/v1/batches", "post"), ("/v1/embeddings", "post")]:
        responses = paths[path][method]["responses"]
        ok = responses["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"].startswith("#/components/schemas/") and ok["$ref"] != "#/components/schemas/Error", path
        assert {"400", "401", "500"} <= set(responses), path
    assert "404" in paths["/v1/files/{file_id}"]["get"]["responses"]
    assert "409" in paths["/v1/batches/{batch_id}/cancel"]["post"]["responses"]


def test_document_declares_the_bearer_scheme(document):
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": document["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    assert document["security"] == [{"bearerAuth": []}]


@pytest.mark.django_db
def test_documenting_bodies_leaves_parsing_to_the_views(client, setup):
    """Ninja must not parse (nor refuse) the bodies it documents: the views read them once."""
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "extra_field": {"x": 1}}' % (
        setup.alias.encode())

    resp = client.post("/v1/chat/completions", data=body, content_type="text/plain",
                       HTTP_AUTHORIZATION=f"Bearer {setup.secret}")

    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "Echo: hi"


# --- endpoint scope of /v1/budget -------------------------------------------------------------


@pytest.mark.django_db
def test_budget_checks_the_key_scope_against_its_own_path(client, upstream):
    chat_only = make_setup(upstream, allowed_endpoints=["/v1/chat/*"])
    budget_allowed = f.ApiKeyFactory(tenant=chat_only.tenant, allowed_endpoints=["/v1/budget"])

    refused = client.get("/v1/budget", HTTP_AUTHORIZATION=f"Bearer {chat_only.secret}")
    allowed = client.get("/v1/budget", HTTP_AUTHORIZATION=f"Bearer {budget_allowed.secret}")
    chat = client.post("/v1/chat/completions", content_type="application/json",
                       data={"model": chat_only.alias, "messages": [{"role": "user", "content": "hi"}]},
                       HTTP_AUTHORIZATION=f"Bearer {chat_only.secret}")

    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "endpoint_not_allowed"
    assert "/v1/budget" in refused.json()["error"]["message"]
    assert allowed.status_code == 200
    assert allowed.json()["object"] == "list"
    assert chat.status_code == 200  # the chat-only key still chats


def test_budget_scope_on_the_data_plane(live_gateway, upstream):
    chat_only = make_setup(upstream, allowed_endpoints=["/v1/chat/*"])
    budget_allowed = f.ApiKeyFactory(tenant=chat_only.tenant, allowed_endpoints=["/v1/budget"])

    refused = httpx.get(f"{live_gateway}/v1/budget", headers={"authorization": f"Bearer {chat_only.secret}"})
    allowed = httpx.get(f"{live_gateway}/v1/budget", headers={"authorization": f"Bearer {budget_allowed.secret}"})

    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "endpoint_not_allowed"
    assert allowed.status_code == 200


@pytest.mark.parametrize(("exc", "status", "type_"), [
    (lambda: HttpError(429, "Too many requests."), 429, "rate_limit_error"),
    (lambda: AuthenticationError(), 401, "invalid_request_error"),
    (lambda: Http404("nothing"), 404, "invalid_request_error"),
    (lambda: NinjaValidationError([{"type": "missing", "loc": ["query", "purpose"], "msg": "Field required"}]),
     400, "invalid_request_error"),
])
def test_ninja_own_errors_render_openai_shaped(rf, exc, status, type_):
    """Whatever ninja itself raises on /v1 (its HttpError kinds, Http404, parameter validation)."""
    resp = api.on_exception(rf.get("/v1/models"), exc())

    assert resp.status_code == status
    error = orjson.loads(resp.content)["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == type_


def test_every_operation_documents_its_body_answers_and_errors(document):
    """A /v1 endpoint added later must say what it takes and answers (openapi_extra, apps/gateway/
    openapi.py), or the schemathesis run cannot check it."""
    undocumented = []
    for path, operations in document["paths"].items():
        for method, spec in operations.items():
            responses = spec["responses"]
            ok = responses.get("200") or responses.get("202") or {}
            if not ok.get("content"):
                undocumented.append(f"{method.upper()} {path}: no answer body")
            if not any(int(status) >= 400 for status in responses):
                undocumented.append(f"{method.upper()} {path}: no error responses")
            if method == "post" and "requestBody" not in spec and not path.endswith("/cancel"):
                undocumented.append(f"{method.upper()} {path}: no request body")
    assert not undocumented, "\n".join(undocumented)
