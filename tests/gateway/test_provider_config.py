"""gateway_apply's provider and routing fields, alias pin auditing, the admin, and the probes."""

from decimal import Decimal

import pytest

from apps.gateway import services
from apps.gateway.config_schema import ConfigError, config_parse
from apps.gateway.models import Deployment, DeploymentHealth, ModelAlias, Provider
from apps.gateway.selectors import deployment_health
from apps.keys.models import AuditLog
from tests import factories as f

pytestmark = pytest.mark.django_db

CONFIG = """
providers:
  - name: azure-eu
    kind: azure_openai
    api_base: https://example-eu.openai.azure.com
    options: {api_version: "2024-10-21"}
  - name: claude
    kind: anthropic
    options: {anthropic_version: "2023-06-01", default_max_tokens: 2048}
  - name: local
    kind: mock
models:
  - alias: chat
    strategy: cheapest
    input_usd_per_mtok: 1
    output_usd_per_mtok: 2
    deployments:
      - {provider: azure-eu, model: gpt-4o-2024-08-06, region: eu-west, rpm: 600, tpm: 100000,
         input_usd_per_mtok: 2.5, output_usd_per_mtok: 10}
      - {provider: claude, model: claude-3-5-haiku-20241022, region: us-east, priority: 1}
  - alias: embed
    supports_chat: false
    supports_embeddings: true
    deployments:
      - {provider: local, model: emb-1}
tenants:
  - slug: acme
    name: Acme
    allowed_regions: [eu-west]
"""


def test_config_sets_provider_options_routing_and_deployment_costs():
    services.config_apply(cfg=config_parse(CONFIG))

    assert Provider.objects.get(name="azure-eu").options == {"api_version": "2024-10-21"}
    assert Provider.objects.get(name="claude").api_base == ""  # the public default
    d = Deployment.objects.get(upstream_model="gpt-4o-2024-08-06")
    assert (d.region, d.rpm, d.tpm) == ("eu-west", 600, 100000)
    assert (d.input_usd_per_mtok, d.output_usd_per_mtok) == (Decimal("2.5"), Decimal("10"))
    assert ModelAlias.objects.get(alias="chat").strategy == "cheapest"
    assert not ModelAlias.objects.get(alias="embed").supports_chat


@pytest.mark.parametrize(("snippet", "error"), [
    ("- {name: a, kind: azure_openai}", "providers[0].api_base: is required for kind azure_openai"),
    ("- {name: a, kind: azure_openai, api_base: 'https://x', options: {version: '1'}}",
     "providers[0].options.version: is not an option of kind azure_openai (options: api_version)"),
    ("- {name: a, kind: anthropic, options: {default_max_tokens: lots}}",
     "providers[0].options.default_max_tokens: has the wrong type"),
    ("- {name: a, kind: openai_compatible, api_base: localhost:8000/v1}",
     "providers[0].api_base: must be an http:// or https:// URL"),
])
def test_config_rejects_bad_provider_options(snippet, error):
    with pytest.raises(ConfigError) as exc:
        config_parse("providers:\n  " + snippet)

    assert exc.value.errors == [error]


def test_changing_an_alias_pin_is_audited():
    services.config_apply(cfg=config_parse(CONFIG))
    services.config_apply(cfg=config_parse(CONFIG))  # idempotent: no repin
    assert not AuditLog.objects.filter(action="repin").exclude(before={"pins": []}).exists()

    services.config_apply(cfg=config_parse(CONFIG.replace("gpt-4o-2024-08-06", "gpt-4o-2024-11-20")))

    log = AuditLog.objects.filter(action="repin").latest("id")
    assert log.object_type == "modelalias"
    assert log.before == {"pins": ["azure-eu:gpt-4o-2024-08-06", "claude:claude-3-5-haiku-20241022"]}
    assert log.after == {"pins": ["azure-eu:gpt-4o-2024-11-20", "claude:claude-3-5-haiku-20241022"]}


def test_admin_pages_never_show_the_decrypted_credential(client):
    admin = f.UserFactory(is_superuser=True)
    client.force_login(admin)
    cred = f.ProviderCredentialFactory(name="azure-key")
    provider = f.ProviderFactory(name="azure", kind="azure_openai", api_base="https://x", credential=cred)
    alias = f.ModelAliasFactory(alias="chat")
    f.DeploymentFactory(alias=alias, provider=provider)

    pages = [client.get(url) for url in ("/admin/gateway/provider/", f"/admin/gateway/provider/{provider.id}/change/",
                                         f"/admin/gateway/modelalias/{alias.id}/change/",
                                         "/admin/gateway/deployment/", "/admin/gateway/deploymenthealth/")]

    assert [p.status_code for p in pages] == [200] * 5
    assert all(b"upstream-secret-xyz" not in p.content for p in pages)
    assert b"azure-key" in pages[0].content


def test_admin_edit_of_a_deployment_pin_is_audited(client):
    client.force_login(f.UserFactory(is_superuser=True))
    provider = f.ProviderFactory(name="p", kind="mock")
    d = f.DeploymentFactory(alias=f.ModelAliasFactory(alias="chat"), provider=provider, upstream_model="v1")

    resp = client.post(f"/admin/gateway/deployment/{d.id}/change/", {
        "alias": d.alias_id, "provider": provider.id, "upstream_model": "v2", "weight": 1, "priority": 0,
        "region": "", "is_active": "on"})

    assert resp.status_code == 302
    assert AuditLog.objects.filter(action="update", object_type="deployment").exists()
    assert AuditLog.objects.get(action="repin").after == {"pins": ["p:v2"]}


def test_probe_records_availability_and_latency(upstream, client):
    ok = f.DeploymentFactory(provider=f.ProviderFactory(kind="mock"), upstream_model="fine")
    down = f.DeploymentFactory(provider=f.ProviderFactory(kind="openai_compatible", api_base=upstream.base_url),
                               upstream_model="fail-503")
    emb = f.DeploymentFactory(alias=f.ModelAliasFactory(supports_chat=False, supports_embeddings=True),
                              provider=f.ProviderFactory(kind="openai_compatible", api_base=upstream.base_url),
                              upstream_model="emb")

    from apps.gateway.tasks import deployments_probe

    assert deployments_probe() == 3

    rows = {h.deployment_id: h for h in DeploymentHealth.objects.all()}
    assert rows[ok.id].ok
    assert rows[ok.id].latency_ms is not None
    assert not rows[down.id].ok
    assert "503" in rows[down.id].error
    assert rows[emb.id].ok
    assert upstream.requests[-1]["path"] in ("/v1/embeddings", "/v1/chat/completions")
    assert [r["body"]["max_tokens"] for r in upstream.requests if r["path"] == "/v1/chat/completions"] == [1]
    health = {h.deployment_id: h for h in deployment_health()}
    assert (health[ok.id].availability, health[down.id].availability) == (1.0, 0.0)
    ready = client.get("/readyz").json()
    assert ready["deployments"] == {"total": 3, "up": 2, "down": 1, "unprobed": 0}


def test_config_rejects_the_same_provider_and_model_twice_in_an_alias():
    text = """
providers: [{name: p, kind: mock}]
models:
  - alias: a
    deployments:
      - {provider: p, model: m, region: eu-west}
      - {provider: p, model: m, region: us-east}
"""
    with pytest.raises(ConfigError) as exc:
        config_parse(text)

    assert exc.value.errors == ["models[0].deployments[1]: duplicate deployment p:m (one per provider and model "
                                "within an alias)"]
