"""A canary as a new user runs it, end to end on a live gateway with the OpenAI SDK: add a new
version of a model with `gateway_apply`, roll it out to 10% by command, compare the versions on
the dashboard, roll it back."""

from datetime import timedelta
from io import StringIO
from pathlib import Path

import openai
from django.core.management import call_command
from django.utils import timezone

from apps.analytics.models import UsageEvent
from apps.analytics.services import usage_rollup_recompute
from apps.gateway.versions import version_rng_seed
from apps.keys.models import AuditLog, Role, Tenant
from tests import factories as f
from tests.keys.personas import member

CONFIG = """
providers:
  - {name: mock, kind: mock}
models:
  - alias: chat
    input_usd_per_mtok: 1
    output_usd_per_mtok: 2
    deployments:
      - {provider: mock, model: gpt-4o-2024-05-13, version: "2024-05-13"}
%s
tenants:
  - {slug: acme, name: Acme, sources: [{name: bot, type: application}]}
"""
NEW_DEPLOYMENT = '      - {provider: mock, model: gpt-4o-2024-08-06, version: "2024-08-06"}\n' \
                 '    rollout: {version: "2024-05-13", share: 100}'


def test_canary_rolled_out_compared_and_rolled_back(live_gateway, tmp_path: Path, client):
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG % "")
    call_command("gateway_apply", str(path), stdout=StringIO())
    # The new version arrives with no traffic: the old one keeps 100% until the rollout.
    path.write_text(CONFIG % NEW_DEPLOYMENT)
    call_command("gateway_apply", str(path), stdout=StringIO())
    key = f.ApiKeyFactory(tenant=Tenant.objects.get(slug="acme"))
    sdk = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)
    assert {m.id for m in sdk.models.list()} == {"chat", "chat@2024-05-13", "chat@2024-08-06"}

    call_command("model_rollout", "chat", "2024-08-06", "--share", "10", stdout=StringIO())
    version_rng_seed(7)
    seen = []
    for _ in range(200):
        raw = sdk.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        seen.append(raw.headers["x-gateway-model-version"])
    pinned = sdk.chat.completions.with_raw_response.create(model="chat@2024-08-06",
                                                           messages=[{"role": "user", "content": "hi"}])
    assert pinned.headers["x-gateway-model-version"] == "2024-08-06"
    assert 2 <= seen.count("2024-08-06") <= 40  # 10% of 200: 20 +- 4.2 standard deviations

    now = timezone.now()
    usage_rollup_recompute(since=now - timedelta(hours=1), until=now + timedelta(minutes=1))
    client.force_login(member(key.tenant, Role.MANAGER, "ann"))
    page = client.get("/dashboard/versions/", {"model": "chat"}).content.decode()
    assert 'data-version="2024-05-13"' in page and 'data-version="2024-08-06"' in page

    call_command("model_rollback", "chat", stdout=StringIO())
    for _ in range(20):
        raw = sdk.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-gateway-model-version"] == "2024-05-13"
    assert AuditLog.objects.filter(object_type="modelalias", action="rollback").count() == 1
    assert UsageEvent.objects.filter(model_version="2024-08-06").count() == seen.count("2024-08-06") + 1
