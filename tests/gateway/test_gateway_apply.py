"""`gateway_apply FILE.yaml`: the declarative config, idempotent and all-or-nothing."""

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.analytics.models import RequestLogPolicy
from apps.billing.models import Budget, Price
from apps.gateway.models import Deployment, ModelAlias, Provider, RateLimit
from apps.keys.models import AuditLog, Membership, ProviderCredential, Source, Tenant

pytestmark = pytest.mark.django_db

CONFIG = """
providers:
  - name: local-openai
    kind: openai_compatible
    api_base: http://127.0.0.1:9999/v1
    api_key_env: LOCAL_OPENAI_KEY
models:
  - alias: gpt-4o-mini
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    deployments:
      - {provider: local-openai, model: gpt-4o-mini, weight: 1, priority: 0}
tenants:
  - slug: acme
    name: Acme Corp
    timezone: Europe/Berlin
    sources: [{name: support-bot, type: application}, {name: etl, type: service}]
    members: [{username: ann, email: ann@acme.test, role: manager, password_env: ANN_PASSWORD}]
    request_log: {bodies: true, retention_days: 30}
    rate_limits: [{scope: tenant, rpm: 600, tpm: 200000}, {scope: "source:etl", rpm: 60}]
    budgets:
      - {name: acme-monthly, scope: tenant, limit_usd: 100, period: monthly,
         enforcement: hard, alert_thresholds: [0.5, 0.8, 1.0]}
      - {name: etl-daily, scope: "source:etl", limit_usd: 5, period: daily, enforcement: hard}
"""


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_OPENAI_KEY", "sk-upstream-very-secret")
    monkeypatch.setenv("ANN_PASSWORD", "ann-pass-123")

    def write(text: str = CONFIG):
        path = tmp_path / "gateway.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_apply_creates_the_whole_config(config_file):
    call_command("gateway_apply", config_file(), stdout=StringIO())

    provider = Provider.objects.get(name="local-openai")
    assert provider.credential.reveal() == "sk-upstream-very-secret"
    assert "sk-upstream-very-secret" not in ProviderCredential.objects.get().encrypted_secret
    dep = Deployment.objects.get()
    assert (dep.alias.alias, dep.upstream_model, dep.provider) == ("gpt-4o-mini", "gpt-4o-mini", provider)
    price = Price.objects.get(model="gpt-4o-mini")
    assert (price.input_usd_per_mtok, price.output_usd_per_mtok) == (Decimal("0.15"), Decimal("0.60"))
    acme = Tenant.objects.get(slug="acme")
    assert acme.timezone == "Europe/Berlin"
    assert set(Source.objects.filter(tenant=acme).values_list("name", "type")) == {
        ("support-bot", "application"), ("etl", "service")}
    ann = Membership.objects.get(tenant=acme)
    assert ann.role == "manager" and ann.user.check_password("ann-pass-123")
    assert set(RateLimit.objects.values_list("scope", "scope_value", "rpm", "tpm")) == {
        ("tenant", "", 600, 200000), ("source", "etl", 60, None)}
    etl = Budget.objects.get(name="etl-daily")
    assert (etl.scope, etl.scope_value, etl.limit_usd, etl.period) == ("source", "etl", Decimal("5"), "daily")
    assert Budget.objects.get(name="acme-monthly").alert_thresholds == ["0.5", "0.8", "1.0"]
    policy = RequestLogPolicy.objects.get(tenant=acme)
    assert (policy.enabled, policy.bodies, policy.retention_days) == (True, True, 30)


def test_request_log_is_changed_and_turned_off_by_the_file(config_file):
    call_command("gateway_apply", config_file(), stdout=StringIO())

    call_command("gateway_apply", config_file(CONFIG.replace(
        "request_log: {bodies: true, retention_days: 30}",
        "request_log: {enabled: false, retention_days: 7, redact: ['ACCT-[0-9]+']}")), stdout=StringIO())

    policy = RequestLogPolicy.objects.get()
    assert (policy.enabled, policy.bodies, policy.retention_days, policy.redact_patterns) == (
        False, False, 7, ["ACCT-[0-9]+"])


def test_apply_twice_changes_nothing_the_second_time(config_file):
    path = config_file()
    call_command("gateway_apply", path, stdout=StringIO())
    audit_rows = AuditLog.objects.count()

    call_command("gateway_apply", path, stdout=StringIO())

    assert AuditLog.objects.count() == audit_rows
    assert Price.objects.count() == 1 and Deployment.objects.count() == 1


def test_price_change_adds_a_version_never_edits(config_file):
    call_command("gateway_apply", config_file(), stdout=StringIO())

    call_command("gateway_apply", config_file(CONFIG.replace("0.60", "0.70")), stdout=StringIO())

    versions = list(Price.objects.filter(model="gpt-4o-mini").order_by("effective_from"))
    assert [v.output_usd_per_mtok for v in versions] == [Decimal("0.60"), Decimal("0.70")]


def test_provider_batch_is_set_on_the_deployment(config_file):
    opted = CONFIG.replace("kind: openai_compatible", "kind: openai").replace(
        "weight: 1, priority: 0}", "weight: 1, priority: 0, provider_batch: true}")

    call_command("gateway_apply", config_file(opted), stdout=StringIO())
    assert Deployment.objects.get(upstream_model="gpt-4o-mini").provider_batch is True

    call_command("gateway_apply", config_file(opted.replace(", provider_batch: true", "")), stdout=StringIO())
    assert Deployment.objects.get(upstream_model="gpt-4o-mini").provider_batch is False


def test_deployment_removed_from_the_file_is_deactivated(config_file):
    call_command("gateway_apply", config_file(), stdout=StringIO())
    second = CONFIG.replace("      - {provider: local-openai, model: gpt-4o-mini, weight: 1, priority: 0}",
                            "      - {provider: local-openai, model: gpt-4o-mini-2024, weight: 1, priority: 0}")

    call_command("gateway_apply", config_file(second), stdout=StringIO())

    assert list(Deployment.objects.filter(is_active=True).values_list("upstream_model", flat=True)) == [
        "gpt-4o-mini-2024"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("period: daily", "period: hourly"),
         "tenants[0].budgets[1].period: must be one of daily, weekly, monthly, total"),
        (("kind: openai_compatible", "kind: cohere"), "providers[0].kind: must be one of openai, azure_openai"),
        (("{provider: local-openai,", "{provider: nowhere,"), "models[0].deployments[0].provider: unknown provider"),
        (("timezone: Europe/Berlin", "timezone: Mars/Olympus"), "tenants[0].timezone: unknown time zone"),
        (('scope: "source:etl", rpm: 60', 'scope: "source:nope", rpm: 60'),
         "tenants[0].rate_limits[1].scope: unknown source 'nope'"),
        (("limit_usd: 5,", "limit_usd: -5,"), "tenants[0].budgets[1].limit_usd"),
        (("name: Acme Corp", "name: Acme Corp\n    colour: red"), "tenants[0].colour: is not a recognised field"),
        (("retention_days: 30}", "retention_days: 30, redact: ['(unclosed']}"),
         "tenants[0].request_log.redact: [0] is not a valid regular expression"),
        (("retention_days: 30}", "retention_days: 0}"), "tenants[0].request_log.retention_days"),
        (("weight: 1, priority: 0}", "weight: 1, priority: 0, provider_batch: true}"),
         "models[0].deployments[0].provider_batch: openai_compatible providers have no batch API"),
    ],
)
def test_bad_file_names_the_field_and_changes_nothing(config_file, change, message):
    with pytest.raises(CommandError) as exc:
        call_command("gateway_apply", config_file(CONFIG.replace(*change)), stdout=StringIO())

    assert message in str(exc.value)
    assert not Tenant.objects.exists() and not Provider.objects.exists() and not ModelAlias.objects.exists()


def test_missing_secret_env_is_an_error(config_file, monkeypatch):
    monkeypatch.delenv("LOCAL_OPENAI_KEY")

    with pytest.raises(CommandError) as exc:
        call_command("gateway_apply", config_file(), stdout=StringIO())

    assert "providers[0].api_key_env: environment variable LOCAL_OPENAI_KEY is not set" in str(exc.value)


def test_not_yaml_is_an_error(config_file):
    with pytest.raises(CommandError, match="not valid YAML"):
        call_command("gateway_apply", config_file("providers: [unclosed"), stdout=StringIO())


def test_audit_never_holds_the_provider_secret(config_file):
    call_command("gateway_apply", config_file(), stdout=StringIO())

    dumped = str(list(AuditLog.objects.values("before", "after")))
    assert "sk-upstream-very-secret" not in dumped


def test_semantic_cache_settings_are_applied(config_file):
    text = CONFIG.replace("    timezone: Europe/Berlin\n", "    timezone: Europe/Berlin\n    cache: {enabled: true, "
                          "ttl_s: 600, semantic: {embedding_alias: text-embedding-3-small, threshold: 0.92}}\n")
    text = text.replace("    output_usd_per_mtok: 0.60\n", "    output_usd_per_mtok: 0.60\n"
                        "    semantic_cache_threshold: 0.97\n")
    call_command("gateway_apply", config_file(text), stdout=StringIO())

    acme = Tenant.objects.get(slug="acme")
    assert (acme.semantic_cache_enabled, acme.semantic_cache_embedding_alias, acme.semantic_cache_threshold) == (
        True, "text-embedding-3-small", Decimal("0.92"))
    assert ModelAlias.objects.get(alias="gpt-4o-mini").semantic_cache_threshold == Decimal("0.97")

    call_command("gateway_apply", config_file(text.replace("semantic: {", "semantic: {enabled: false, ")),
                 stdout=StringIO())
    assert not Tenant.objects.get(slug="acme").semantic_cache_enabled


def test_semantic_cache_needs_an_embedding_alias(config_file):
    text = CONFIG.replace("    timezone: Europe/Berlin\n", "    timezone: Europe/Berlin\n"
                          "    cache: {semantic: {threshold: 0.9}}\n")
    with pytest.raises(CommandError) as exc:
        call_command("gateway_apply", config_file(text), stdout=StringIO())

    assert "tenants[0].cache.semantic" in str(exc.value) and "embedding_alias is required" in str(exc.value)
    assert not Tenant.objects.exists()
