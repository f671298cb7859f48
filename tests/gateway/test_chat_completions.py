"""POST /v1/chat/completions through the Django test client, upstream on a real loopback socket."""

import orjson
import pytest

from apps.analytics.models import UsageEvent
from tests import factories as f

pytestmark = pytest.mark.django_db


def post(client, secret, body, path="/v1/chat/completions"):
    return client.post(path, data=orjson.dumps(body) if not isinstance(body, bytes) else body,
                       content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}")


def chat(alias, content="hello", **extra):
    return {"model": alias, "messages": [{"role": "user", "content": content}], **extra}


def test_chat_completion_relays_upstream_answer_and_records_cost(client, setup, upstream):
    resp = post(client, setup.secret, chat(setup.alias, "hello world"))

    assert resp.status_code == 200
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == "Echo: hello world"
    sent = upstream.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["model"] == "gpt-up"
    assert sent["headers"]["Authorization"] == "Bearer upstream-secret-xyz"
    event = UsageEvent.objects.get(request_id=resp["x-request-id"])
    assert (event.prompt_tokens, event.completion_tokens) == (body["usage"]["prompt_tokens"],
                                                               body["usage"]["completion_tokens"])
    # 1 $/Mtok in, 2 $/Mtok out
    expected = (event.prompt_tokens * 1 + event.completion_tokens * 2) / 1_000_000
    assert float(event.cost) == pytest.approx(expected)
    assert resp["x-gateway-cost-usd"] == str(event.cost)
    assert event.price_id == setup.price.id
    assert event.tenant_id == setup.tenant.id and event.status == 200


def _tenant_wide_key_with_crm(setup):
    """The key books on no source of its own, so it may name the tenant's declared ones."""
    f.SourceFactory(tenant=setup.tenant, name="crm", type="service")
    setup.key.source = None
    setup.key.save()


def test_our_fields_are_not_sent_upstream(client, setup, upstream):
    _tenant_wide_key_with_crm(setup)
    f.BudgetFactory(tenant=setup.tenant, scope="budget_id", scope_value="b-7", enforcement="soft")
    body = chat(setup.alias, metadata={"budget_id": "b-7", "source_id": "crm"}, cache=False, batch_id="nightly")
    resp = post(client, setup.secret, body)

    assert resp.status_code == 200
    sent = upstream.requests[-1]["body"]
    assert not {"metadata", "cache", "batch_id"} & set(sent)
    event = UsageEvent.objects.get(request_id=resp["x-request-id"])
    assert (event.budget_id, event.source_ref, event.batch_id) == ("b-7", "crm", "nightly")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "gpt-test"}, "messages"),
        ({"model": "gpt-test", "messages": []}, "messages"),
        ({"model": "gpt-test", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "metadata": {"priority": "hi"}},
         "metadata.priority"),
    ],
)
def test_invalid_fields_get_400_naming_the_field(client, setup, body, param):
    resp = post(client, setup.secret, body)

    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param in err["message"]


def test_malformed_json_gets_400(client, setup):
    resp = post(client, setup.secret, b'{"model": ')

    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]
    assert resp["x-request-id"]


def test_missing_and_wrong_keys_get_401(client, setup):
    no_key = client.post("/v1/chat/completions", data=b"{}", content_type="application/json")
    wrong = post(client, "sk-not-a-real-key", chat(setup.alias))

    assert no_key.status_code == wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert "sk-not-a-real-key" not in wrong.content.decode()


def test_revoked_and_expired_keys_get_401(client, setup):
    from datetime import timedelta

    from django.utils import timezone

    revoked = f.ApiKeyFactory(tenant=setup.tenant, source=setup.source, revoked_at=timezone.now())
    expired = f.ApiKeyFactory(tenant=setup.tenant, source=setup.source,
                              expires_at=timezone.now() - timedelta(minutes=1))

    revoked_answer = post(client, revoked.secret, chat(setup.alias)).json()["error"]["message"]
    expired_answer = post(client, expired.secret, chat(setup.alias)).json()["error"]["message"]

    assert revoked_answer == "This API key has been revoked."
    assert expired_answer == "This API key has expired."


def test_unknown_model_gets_404_and_is_recorded(client, setup):
    resp = post(client, setup.secret, chat("no-such-model"))

    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    event = UsageEvent.objects.get(request_id=resp["x-request-id"])
    assert (event.status, event.error_code, event.cost) == (404, "model_not_found", 0)


def test_model_outside_key_scope_gets_403(client, setup):
    scoped = f.ApiKeyFactory(tenant=setup.tenant, source=setup.source, allowed_models=["other-model"])

    resp = post(client, scoped.secret, chat(setup.alias))

    assert resp.status_code == 403
    assert resp.json()["error"]["type"] == "permission_error"


def test_upstream_failure_after_retries_gets_502_and_is_recorded(client, setup, upstream):
    setup.deployment.upstream_model = "fail-500"
    setup.deployment.save()

    resp = post(client, setup.secret, chat(setup.alias))

    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "api_error"
    assert len(upstream.requests) == 2  # one retry on the only deployment
    assert UsageEvent.objects.get(request_id=resp["x-request-id"]).status == 502


def test_upstream_400_is_not_retried_and_keeps_upstream_message(client, setup, upstream):
    setup.deployment.upstream_model = "fail-400"
    setup.deployment.save()

    resp = post(client, setup.secret, chat(setup.alias))

    assert resp.status_code == 400
    assert "fake upstream error 400" in resp.json()["error"]["message"]
    assert len(upstream.requests) == 1


def test_unpriced_model_is_refused_unless_tenant_allows(client, setup):
    setup.price.delete()

    refused = post(client, setup.secret, chat(setup.alias))
    setup.tenant.allow_unpriced_models = True
    setup.tenant.save()
    from apps.gateway import pipeline

    pipeline._auth_cache.forget()
    allowed = post(client, setup.secret, chat(setup.alias))

    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_priced"
    assert allowed.status_code == 200


def test_seed_envelope_runs_the_same_pipeline(client, setup, upstream):
    _tenant_wide_key_with_crm(setup)
    f.BudgetFactory(tenant=setup.tenant, scope="budget_id", scope_value="q4", enforcement="soft")
    body = {"request": {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}],
                        "options": {"temperature": 0, "max_tokens": 50},
                        "metadata": {"source_id": "crm", "source_type": "service", "budget_id": "q4"}}}
    resp = post(client, setup.secret, body, path="/v1/requests")

    assert resp.status_code == 200
    data = resp.json()
    assert data["status"] == "completed" and data["id"] == resp["x-request-id"]
    assert data["result"]["choices"][0]["message"]["content"] == "Echo: hi"
    assert upstream.requests[-1]["body"]["max_tokens"] == 50
    event = UsageEvent.objects.get(request_id=data["id"])
    assert (event.source_type, event.source_ref, event.budget_id) == ("service", "crm", "q4")


def test_seed_envelope_errors_name_the_envelope_path(client, setup):
    body = {"request": {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}],
                        "options": {"temperature": 9}}}
    resp = post(client, setup.secret, body, path="/v1/requests")

    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "request.options.temperature"


def test_models_lists_only_what_the_key_may_use(client, setup):
    f.ModelAliasFactory(alias="other-model")
    scoped = f.ApiKeyFactory(tenant=setup.tenant, source=setup.source, allowed_models=[setup.alias])

    all_models = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {setup.secret}").json()
    scoped_models = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {scoped.secret}").json()

    assert {m["id"] for m in all_models["data"]} == {setup.alias, f"{setup.alias}@gpt-up", "other-model"}
    assert [m["id"] for m in scoped_models["data"]] == [setup.alias, f"{setup.alias}@gpt-up"]


def test_models_of_a_region_restricted_tenant_lists_only_what_its_regions_serve(client, setup):
    setup.tenant.allowed_regions = ["eu-west"]
    setup.tenant.save()
    setup.deployment.region = "eu-west"
    setup.deployment.save()
    f.DeploymentFactory(alias=f.ModelAliasFactory(alias="us-only"), provider=setup.provider, region="us-east")

    resp = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {setup.secret}")

    assert [m["id"] for m in resp.json()["data"]] == [setup.alias, f"{setup.alias}@gpt-up"]


def test_unknown_v1_path_is_an_openai_error_with_request_id(client):
    resp = client.get("/v1/nothing-here")

    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "unknown_url"
    assert resp["x-request-id"].startswith("req_")


def test_wrong_method_is_an_openai_error_under_the_standard_handler_too(client, setup):
    resp = client.get("/v1/embeddings", HTTP_AUTHORIZATION=f"Bearer {setup.secret}")

    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"
    assert resp["Allow"] == "POST"
