"""key_create, demo_setup and usage_export as a user runs them."""

import csv
import json
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.keys import crypto
from apps.keys.models import ApiKey, AuditLog
from tests import factories as f

pytestmark = pytest.mark.django_db


def test_key_create_prints_the_secret_alone_and_stores_only_its_digest():
    source = f.SourceFactory(tenant=f.TenantFactory(slug="acme"), name="bot")
    out = StringIO()

    call_command("key_create", "--tenant", "acme", "--source", "bot", "--name", "k1", "--models", "a,b",
                 "--rpm", "10", "--tpm", "1000", "--expires-days", "30", stdout=out)

    secret = out.getvalue().strip()
    assert secret.startswith("sk-") and "\n" not in secret
    key = ApiKey.objects.get(name="k1")
    assert key.digest == crypto.api_key_digest(secret) and secret not in key.digest
    assert key.prefix == secret[:10]
    assert (key.source, key.allowed_models, key.rpm, key.tpm) == (source, ["a", "b"], 10, 1000)
    assert key.expires_at is not None
    assert secret not in str(list(AuditLog.objects.values("before", "after")))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "nope", "--source", "bot"], "--tenant: no tenant"),
        (["--tenant", "acme", "--source", "nope"], "--source: tenant acme has no source"),
        (["--tenant", "acme", "--source", "bot", "--rpm", "0"], "--rpm: must be a positive number"),
    ],
)
def test_key_create_bad_arguments(args, message):
    f.SourceFactory(tenant=f.TenantFactory(slug="acme"), name="bot")

    with pytest.raises(CommandError, match=message):
        call_command("key_create", *args, stdout=StringIO())


def test_demo_setup_is_idempotent_and_prints_a_working_key(client):
    first, second = StringIO(), StringIO()
    call_command("demo_setup", stdout=first)
    rows = AuditLog.objects.count()
    call_command("demo_setup", stdout=second)

    assert first.getvalue() == second.getvalue()
    assert AuditLog.objects.count() == rows
    resp = client.post("/v1/chat/completions", content_type="application/json",
                       data={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                       HTTP_AUTHORIZATION=f"Bearer {first.getvalue().strip()}")
    assert resp.status_code == 200


def test_usage_export_json_lines_in_the_seed_shape():
    tenant = f.TenantFactory(slug="acme")
    other = f.TenantFactory(slug="other")
    f.UsageEventFactory(tenant=tenant, cost=Decimal("0.0012500000"), batch_id="b1", budget_id="q4", cached=True)
    f.UsageEventFactory(tenant=other)
    out = StringIO()

    call_command("usage_export", "--tenant", "acme", "--format", "json", stdout=out)

    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])["usage_event"]
    assert set(event) == {"timestamp", "source", "request_type", "tokens", "model", "cost", "metadata"}
    assert event["cost"] == "0.0012500000"
    assert event["tokens"] == {"prompt": 10, "completion": 20}
    assert event["metadata"] == {"async": False, "cached": True, "batch_id": "b1", "budget_id": "q4"}


def test_usage_export_csv_columns_and_date_filters():
    from datetime import UTC, datetime

    tenant = f.TenantFactory(slug="acme")
    f.UsageEventFactory(tenant=tenant, timestamp=datetime(2026, 1, 5, tzinfo=UTC))
    f.UsageEventFactory(tenant=tenant, timestamp=datetime(2026, 2, 5, tzinfo=UTC))
    out = StringIO()

    call_command("usage_export", "--tenant", "acme", "--format", "csv", "--since", "2026-02-01", stdout=out)

    rows = list(csv.reader(StringIO(out.getvalue())))
    assert rows[0] == ["request_id", "timestamp", "tenant", "source_type", "source_id", "key", "request_type",
                       "model", "prompt_tokens", "completion_tokens", "cost", "async", "cached", "batch_id",
                       "budget_id", "status", "latency_ms", "model_version", "tags", "end_user"]
    assert len(rows) == 2 and rows[1][1].startswith("2026-02-05")


def test_usage_export_rejects_bad_dates():
    f.TenantFactory(slug="acme")

    with pytest.raises(CommandError, match="--since: not an ISO date"):
        call_command("usage_export", "--tenant", "acme", "--since", "yesterday", stdout=StringIO())


def test_demo_setup_audits_as_the_cli_user_via_cli():
    call_command("demo_setup", stdout=StringIO())
    rows = AuditLog.objects.all()
    assert rows.exists()
    assert {r.via for r in rows} == {"cli"}
    assert all(r.actor == "cli" or r.actor.startswith("cli:") for r in rows)
