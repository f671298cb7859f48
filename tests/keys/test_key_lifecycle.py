"""Key lifecycle: scopes, expiry, revocation (across instances), rotation with a grace period, and
last-use times collected without a write per request."""

import time
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.core.management import call_command

from apps.gateway import pipeline
from apps.keys import crypto, last_used
from apps.keys.models import ApiKey, AuditLog
from apps.keys.services import api_key_create, api_key_revoke, api_key_rotate, api_key_update, cli_actor
from tests import factories as f
from tests.conftest import make_setup


def post(client, secret, body, path="/v1/chat/completions"):
    return client.post(path, data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


def models(client, secret):
    return client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {secret}")


def chat(alias, content="hello"):
    return {"model": alias, "messages": [{"role": "user", "content": content}]}


def forget_auth_cache():
    """What an instance would see after GATEWAY_AUTH_CACHE_TTL_S (time-machine moves wall time,
    not the monotonic clock the auth cache uses)."""
    pipeline._auth_cache.forget()


# --- scopes -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_endpoint_scope_applies_to_every_v1_endpoint_including_models(client, setup):
    embeddings_only = f.ApiKeyFactory(tenant=setup.tenant, allowed_endpoints=["/v1/embeddings"])
    models_only = f.ApiKeyFactory(tenant=setup.tenant, allowed_endpoints=["/v1/models"])

    refused = [models(client, embeddings_only.secret), post(client, embeddings_only.secret, chat(setup.alias)),
               post(client, models_only.secret, {"request": chat(setup.alias)}, path="/v1/requests")]

    assert [r.status_code for r in refused] == [403, 403, 403]
    assert {r.json()["error"]["code"] for r in refused} == {"endpoint_not_allowed"}
    assert "/v1/requests" in refused[2].json()["error"]["message"]
    assert models(client, models_only.secret).status_code == 200


@pytest.mark.django_db
def test_endpoint_scope_accepts_a_trailing_wildcard(client, setup):
    key = f.ApiKeyFactory(tenant=setup.tenant, allowed_endpoints=["/v1/chat/*", "/v1/models"])

    assert post(client, key.secret, chat(setup.alias)).status_code == 200
    assert models(client, key.secret).status_code == 200
    assert post(client, key.secret, {"request": chat(setup.alias)}, path="/v1/requests").status_code == 403


@pytest.mark.django_db
def test_model_scope_filters_models_and_refuses_others(client, setup):
    f.ModelAliasFactory(alias="other-model")
    key = f.ApiKeyFactory(tenant=setup.tenant, allowed_models=[setup.alias])

    assert [m["id"] for m in models(client, key.secret).json()["data"]] == [setup.alias, f"{setup.alias}@gpt-up"]
    resp = post(client, key.secret, chat("other-model"))
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "model_not_allowed"


@pytest.mark.django_db
def test_a_key_expires_at_its_expiry_time(client, setup):
    key = f.ApiKeyFactory(tenant=setup.tenant, expires_at=datetime(2031, 6, 1, 12, tzinfo=UTC))
    with time_machine.travel(datetime(2031, 6, 1, 11, 59, tzinfo=UTC), tick=False) as clock:
        assert models(client, key.secret).status_code == 200
        clock.shift(timedelta(minutes=1))

        resp = models(client, key.secret)

    assert resp.status_code == 401
    assert resp.json()["error"]["message"] == "This API key has expired."


@pytest.mark.django_db
def test_per_key_defaults_reach_the_ledger(client, setup):
    from apps.analytics.models import UsageEvent

    created = api_key_create(tenant=setup.tenant, source=f.SourceFactory(tenant=setup.tenant, type="service"),
                             name="etl", actor="ann", default_budget_id="etl-daily")

    resp = post(client, created.secret, chat(setup.alias))

    event = UsageEvent.objects.get(request_id=resp["x-request-id"])
    assert (event.budget_id, event.source_type, event.source_id) == ("etl-daily", "service", created.key.source_id)


@pytest.mark.django_db
def test_a_key_cannot_use_a_source_of_another_tenant(setup):
    with pytest.raises(ValidationError):
        api_key_create(tenant=setup.tenant, source=f.SourceFactory(), name="x", actor="ann")
    with pytest.raises(ValidationError):
        api_key_update(key=setup.key, actor="ann", source=f.SourceFactory())
    with pytest.raises(ValidationError):
        api_key_update(key=setup.key, actor="ann", digest="0" * 64)


# --- revoke -----------------------------------------------------------------------------------


def test_a_revoked_key_is_refused_by_a_second_instance_within_2_s(live_gateway, gateway_process, upstream):
    s = make_setup(upstream)
    instances = [live_gateway, gateway_process]
    headers = {"Authorization": f"Bearer {s.secret}"}
    for url in instances:  # each instance now holds the key in its in-process auth cache
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 200

    api_key_revoke(key=s.key, actor="ann")
    revoked_at = time.monotonic()
    refused_after: dict[str, float] = {}
    while len(refused_after) < len(instances) and time.monotonic() - revoked_at < 5:
        for url in instances:
            if url not in refused_after and httpx.get(f"{url}/v1/models", headers=headers).status_code == 401:
                refused_after[url] = time.monotonic() - revoked_at

    assert set(refused_after) == set(instances)
    assert max(refused_after.values()) < 2.0, refused_after


@pytest.mark.django_db
def test_revoking_is_audited_once(setup):
    api_key_revoke(key=setup.key, actor="ann")
    api_key_revoke(key=setup.key, actor="ann")

    row = AuditLog.objects.get(action="revoke")
    assert (row.actor, row.tenant_id, row.object_id) == ("ann", setup.tenant.id, str(setup.key.id))
    assert row.before["revoked_at"] is None
    assert row.after["revoked_at"] is not None


# --- rotate -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_rotated_keys_old_secret_works_until_the_grace_period_ends(client, setup):
    old = setup.secret
    with time_machine.travel(datetime(2031, 1, 1, tzinfo=UTC), tick=False) as clock:
        new = api_key_rotate(key=setup.key, actor="ann", grace_s=3600).secret
        assert models(client, old).status_code == 200
        assert models(client, new).status_code == 200

        clock.shift(timedelta(seconds=3599))
        forget_auth_cache()
        assert models(client, old).status_code == 200

        clock.shift(timedelta(seconds=2))
        forget_auth_cache()
        assert models(client, old).status_code == 401
        assert models(client, new).status_code == 200


@pytest.mark.django_db
def test_rotation_without_grace_refuses_the_old_secret_at_once(client, setup):
    new = api_key_rotate(key=setup.key, actor="ann").secret
    forget_auth_cache()

    assert models(client, setup.secret).status_code == 401
    assert models(client, new).status_code == 200


@pytest.mark.django_db
def test_rotation_is_audited_without_secrets_and_changes_the_prefix(setup):
    created = api_key_rotate(key=setup.key, actor="ann", grace_s=60)

    key = ApiKey.objects.get(pk=setup.key.pk)
    assert key.prefix == crypto.api_key_display_prefix(created.secret)
    assert key.digest == crypto.api_key_digest(created.secret)
    assert key.previous_digest == crypto.api_key_digest(setup.secret)
    row = AuditLog.objects.get(action="rotate")
    dumped = orjson.dumps([row.before, row.after]).decode()
    assert row.after["grace_s"] == 60
    assert '"digest"' not in dumped
    assert '"previous_digest"' not in dumped
    assert key.digest not in dumped
    assert key.previous_digest not in dumped
    assert created.secret not in dumped
    assert setup.secret not in dumped


@pytest.mark.django_db
def test_a_revoked_key_cannot_be_rotated(setup):
    api_key_revoke(key=setup.key, actor="ann")

    with pytest.raises(ValidationError):
        api_key_rotate(key=setup.key, actor="ann")


# --- last used ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_last_used_is_collected_without_a_write_per_request_and_flushed_in_bulk(client, setup,
                                                                                 django_assert_max_num_queries):
    other = f.ApiKeyFactory(tenant=setup.tenant)
    for secret in (setup.secret, setup.secret, other.secret):
        assert models(client, secret).status_code == 200

    assert ApiKey.objects.filter(last_used_at__isnull=False).count() == 0
    with django_assert_max_num_queries(2):  # one UPDATE per key used, whatever the number of requests
        assert last_used.flush() == 2
    assert ApiKey.objects.filter(last_used_at__isnull=False).count() == 2


@pytest.mark.django_db
def test_last_used_never_moves_backwards(setup):
    later = datetime(2031, 1, 2, tzinfo=UTC)
    ApiKey.objects.filter(pk=setup.key.pk).update(last_used_at=later)
    last_used._seen[setup.key.pk] = datetime(2031, 1, 1, tzinfo=UTC)

    assert last_used.flush() == 0
    assert ApiKey.objects.get(pk=setup.key.pk).last_used_at == later


def test_last_used_is_flushed_by_the_gateway_in_the_background(live_gateway, live_setup, settings):
    settings.GATEWAY_LAST_USED_FLUSH_S = 0
    headers = {"Authorization": f"Bearer {live_setup.secret}"}
    assert httpx.get(f"{live_gateway}/v1/models", headers=headers).status_code == 200

    deadline = time.monotonic() + 10
    while ApiKey.objects.get(pk=live_setup.key.pk).last_used_at is None and time.monotonic() < deadline:
        httpx.get(f"{live_gateway}/v1/models", headers=headers)
        time.sleep(0.05)
    assert ApiKey.objects.get(pk=live_setup.key.pk).last_used_at is not None


# --- command line ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_key_commands_create_rotate_and_revoke(client, setup, capsys):
    call_command("key_create", "--tenant", setup.tenant.slug, "--source", setup.source.name, "--name", "cli-key",
                 "--endpoints", "/v1/models", "--cache", "off", "--budget-id", "b-1")
    secret = capsys.readouterr().out.strip()
    key = ApiKey.objects.get(name="cli-key")
    assert key.allowed_endpoints == ["/v1/models"]
    assert (key.cache_enabled, key.default_budget_id) == (False, "b-1")
    assert models(client, secret).status_code == 200

    call_command("key_rotate", "--tenant", setup.tenant.slug, "--prefix", key.prefix, "--grace-seconds", "0")
    new_secret = capsys.readouterr().out.strip()
    forget_auth_cache()
    assert new_secret != secret
    assert models(client, secret).status_code == 401
    assert models(client, new_secret).status_code == 200

    call_command("key_revoke", "--tenant", setup.tenant.slug, "--name", "cli-key")
    forget_auth_cache()
    assert models(client, new_secret).status_code == 401
    rows = AuditLog.objects.filter(object_id=str(key.pk)).order_by("id")
    who = cli_actor()  # cli:<OS user>
    assert who.startswith("cli")
    assert [(r.action, r.actor, r.via) for r in rows] == [("create", who, "cli"), ("rotate", who, "cli"),
                                                          ("revoke", who, "cli")]
