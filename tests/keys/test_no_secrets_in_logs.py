"""No API key or provider secret in any log line: everything logged (every logger, DEBUG level,
SQL included) while keys are created and rotated, authentication fails, and a provider credential
changes and is used, is searched for the secrets."""

import logging

import orjson
import pytest
from django.core.management import call_command
from django.db import connection

from apps.keys.models import ApiKey, AuditLog, ProviderCredential
from apps.keys.services import api_key_create, api_key_rotate, provider_credential_set
from tests import factories as f

pytestmark = pytest.mark.django_db


@pytest.fixture
def all_logs(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("django", "django.db.backends", "django.request", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    connection.force_debug_cursor = True  # SQL statements and their parameters are logged too
    try:
        yield caplog
    finally:
        connection.force_debug_cursor = False


def test_no_secret_in_logs_or_audit_rows(all_logs, client, setup, upstream, capsys, monkeypatch):
    secrets: list[str] = [setup.secret]
    root = f.UserFactory(username="root", is_superuser=True)
    client.force_login(root)

    # keys: created by the service, the command line and the admin; rotated by all three
    created = api_key_create(tenant=setup.tenant, source=setup.source, name="svc", actor="ann")
    secrets.append(created.secret)
    call_command("key_create", "--tenant", setup.tenant.slug, "--source", setup.source.name, "--name", "cli")
    secrets.append(capsys.readouterr().out.strip())
    resp = client.post("/admin/keys/apikey/add/", {
        "tenant": setup.tenant.pk, "source": setup.source.pk, "name": "adm",
        "cache_enabled": "unknown"})
    secrets.append(resp.context["rows"][0][1])
    secrets.append(api_key_rotate(key=created.key, actor="ann", grace_s=60).secret)
    call_command("key_rotate", "--tenant", setup.tenant.slug, "--name", "cli", "--grace-seconds", "60")
    secrets.append(capsys.readouterr().out.strip())
    resp = client.post("/admin/keys/apikey/", {"action": "rotate_keys_now",
                                               "_selected_action": [ApiKey.objects.get(name="adm").pk]})
    secrets.append(resp.context["rows"][0][1])

    # authentication: good keys, a wrong key (a burst of them), a near miss of a real key
    for secret in secrets[-3:]:
        assert client.post("/v1/chat/completions", data=orjson.dumps(
            {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}]}),
            content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200
    wrong = "sk-not-a-real-key-but-secret-looking-0123456789"
    secrets.append(wrong)
    for bad in [wrong] * 6 + [setup.secret[:-1] + "x"]:
        assert client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {bad}").status_code == 401

    # provider credentials: the service (as gateway_apply uses it), the admin, and a call using one
    provider_secret, admin_secret = "sk-proj-upstream-A1b2C3d4E5", "sk-ant-upstream-Z9y8X7w6"
    secrets += [provider_secret, admin_secret, "upstream-secret-xyz"]
    provider_credential_set(name="provider:openai", secret=provider_secret, actor="cli")
    provider_credential_set(name="provider:openai", secret=provider_secret + "-v2", actor="cli")
    client.post("/admin/keys/providercredential/add/", {"name": "anthropic", "secret": admin_secret})
    cred = ProviderCredential.objects.get(name="anthropic")
    client.post(f"/admin/keys/providercredential/{cred.pk}/change/", {"name": "anthropic",
                                                                       "secret": admin_secret + "-v2"})

    logged = "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r} {getattr(r, 'sql', '')} {getattr(r, 'params', '')!r}"
        for r in all_logs.records)
    assert len(all_logs.records) > 20  # the capture really saw the traffic (SQL included)
    assert "INSERT INTO" in logged
    audit = orjson.dumps(list(AuditLog.objects.values("before", "after", "object_id"))).decode()
    for secret in secrets:
        assert secret not in logged, f"a secret ({secret[:6]}...) appears in the logs"
        assert secret not in audit, f"a secret ({secret[:6]}...) appears in the audit log"
    assert AuditLog.objects.filter(action="auth_failure_burst").exists()
