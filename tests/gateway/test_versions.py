"""Model versions: `alias@version` pinning, rollouts (shares of the bare alias's traffic), rollback,
and the version on every ledger row, export and request log."""

import csv
import io
import json
import math
from decimal import Decimal
from io import StringIO

import orjson
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.analytics.models import RequestLog, RequestLogPolicy, UsageEvent
from apps.gateway.config_schema import ConfigError, config_parse
from apps.gateway.models import ModelAlias
from apps.gateway.services import config_apply, model_rollback, model_rollout
from apps.gateway.versions import RolloutError, shares_split, version_rng_seed
from apps.keys.models import AuditLog, Role
from tests import factories as f
from tests.keys.personas import member

pytestmark = pytest.mark.django_db

OLD, NEW = "2024-05-13", "2024-08-06"


def post(client, secret, model, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.fixture
def chat():
    """`chat` with two versions: the old one on one mock deployment, the new one (labelled) on two
    providers. All instant (the mock provider answers in process)."""
    mock, mock_b = f.ProviderFactory(name="mock", kind="mock"), f.ProviderFactory(name="mock-b", kind="mock")
    alias = f.ModelAliasFactory(alias="chat")
    f.DeploymentFactory(alias=alias, provider=mock, upstream_model="gpt-old", version=OLD)
    f.DeploymentFactory(alias=alias, provider=mock, upstream_model="gpt-new", version=NEW)
    f.DeploymentFactory(alias=alias, provider=mock_b, upstream_model="gpt-new-b", version=NEW)
    f.PriceFactory(model="chat", input_usd_per_mtok=Decimal(1), output_usd_per_mtok=Decimal(2))
    return alias


@pytest.fixture
def key():
    return f.ApiKeyFactory()


def versions_of_ledger():
    return list(UsageEvent.objects.order_by("id").values_list("model_version", flat=True))


# --- pinning -----------------------------------------------------------------------------------


def test_pinned_version_routes_only_to_its_deployments(client, chat, key):
    model_rollout(alias="chat", version=OLD, share=100, actor="test")  # the bare alias would never reach NEW

    answers = [post(client, key.secret, f"chat@{NEW}") for _ in range(20)]

    assert {r.status_code for r in answers} == {200}
    assert {r["x-gateway-model-version"] for r in answers} == {NEW}
    events = UsageEvent.objects.all()
    assert {e.upstream_model for e in events} <= {"gpt-new", "gpt-new-b"}
    assert {(e.model, e.model_version) for e in events} == {("chat", NEW)}


def test_a_version_is_pinned_by_its_upstream_model_when_it_has_no_label(client, key):
    alias = f.ModelAliasFactory(alias="plain")
    f.DeploymentFactory(alias=alias, provider=f.ProviderFactory(kind="mock"), upstream_model="plain-1")
    f.DeploymentFactory(alias=alias, provider=f.ProviderFactory(kind="mock"), upstream_model="plain-2")
    f.PriceFactory(model="plain")

    resp = post(client, key.secret, "plain@plain-2")

    assert resp.status_code == 200
    assert UsageEvent.objects.get().upstream_model == "plain-2"


def test_a_pinned_version_never_falls_back_to_another_version(client, key):
    alias = f.ModelAliasFactory(alias="chat")
    dead = f.ProviderFactory(name="dead", kind="openai_compatible", api_base="http://127.0.0.1:9/v1",
                             credential=f.ProviderCredentialFactory())
    f.DeploymentFactory(alias=alias, provider=dead, upstream_model="gpt-new", version=NEW)
    f.DeploymentFactory(alias=alias, provider=f.ProviderFactory(kind="mock"), upstream_model="gpt-old", version=OLD)
    f.PriceFactory(model="chat")

    resp = post(client, key.secret, f"chat@{NEW}")

    assert resp.status_code in (502, 503)
    event = UsageEvent.objects.get()
    assert event.model_version == NEW
    assert {a["model"] for a in event.attempts} == {"gpt-new"}


@pytest.mark.parametrize("model", ["chat@1999-01-01", "nope@2024-08-06", "chat@", "chat@gpt-retired"])
def test_unknown_alias_version_is_an_openai_404(client, chat, key, model):
    f.DeploymentFactory(alias=chat, provider=f.ProviderFactory(kind="mock"), upstream_model="gpt-retired",
                        is_active=False)

    resp = post(client, key.secret, model)

    assert resp.status_code == 404
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")
    assert model in error["message"]


def test_models_lists_each_alias_and_its_versions_with_their_shares(client, chat, key,
                                                                    django_capture_on_commit_callbacks):
    listed = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key.secret}").json()["data"]
    assert [(m["id"], m.get("share")) for m in listed] == [("chat", None), (f"chat@{OLD}", None),
                                                            (f"chat@{NEW}", None)]

    with django_capture_on_commit_callbacks(execute=True):  # the routing table is reloaded on commit
        model_rollout(alias="chat", version=NEW, share=10, actor="test")
    listed = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key.secret}").json()["data"]

    assert [(m["id"], m.get("share")) for m in listed] == [("chat", None), (f"chat@{OLD}", 90), (f"chat@{NEW}", 10)]
    assert listed[2]["parent"] == "chat" and listed[2]["version"] == NEW


def test_versions_follow_the_keys_model_scope(client, chat):
    """Models are global, the keys of each tenant are scoped: a key that may not use `chat` neither
    sees nor reaches its versions; a key allowed one version gets that version only."""
    other = f.ModelAliasFactory(alias="other")
    f.DeploymentFactory(alias=other, provider=f.ProviderFactory(kind="mock"), upstream_model="o-1")
    outsider = f.ApiKeyFactory(allowed_models=["other"])
    one_version = f.ApiKeyFactory(allowed_models=[f"chat@{NEW}"])

    seen = [m["id"] for m in client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {outsider.secret}").json()["data"]]
    assert seen == ["other", "other@o-1"]
    assert post(client, outsider.secret, f"chat@{NEW}").status_code == 403
    seen = [m["id"] for m in client.get("/v1/models",
                                        HTTP_AUTHORIZATION=f"Bearer {one_version.secret}").json()["data"]]
    assert seen == [f"chat@{NEW}"]
    assert post(client, one_version.secret, f"chat@{NEW}").status_code == 200
    assert post(client, one_version.secret, "chat").status_code == 403
    assert post(client, one_version.secret, f"chat@{OLD}").status_code == 403


def test_a_region_restricted_tenant_sees_only_the_versions_its_regions_serve(client, chat):
    chat.deployments.filter(version=NEW).update(region="us-east")
    chat.deployments.filter(version=OLD).update(region="eu-west")
    key = f.ApiKeyFactory(tenant=f.TenantFactory(allowed_regions=["eu-west"]))

    seen = [m["id"] for m in client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key.secret}").json()["data"]]

    assert seen == ["chat", f"chat@{OLD}"]
    assert post(client, key.secret, f"chat@{NEW}").json()["error"]["code"] == "region_not_allowed"


def test_a_cached_answer_of_a_pinned_version_is_not_served_to_another(client, chat, key):
    first = post(client, key.secret, f"chat@{OLD}", temperature=0)
    again = post(client, key.secret, f"chat@{OLD}", temperature=0)
    other = post(client, key.secret, f"chat@{NEW}", temperature=0)

    assert (first["x-gateway-cache"], again["x-gateway-cache"], other["x-gateway-cache"]) == ("miss", "hit", "miss")
    assert versions_of_ledger() == [OLD, OLD, NEW]  # the hit records the version whose answer it replays


def test_a_rolled_back_versions_cached_answers_are_not_replayed(client, chat, key,
                                                               django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        model_rollout(alias="chat", version=NEW, share=100, actor="test")
    assert post(client, key.secret, "chat", temperature=0)["x-gateway-model-version"] == NEW
    assert post(client, key.secret, "chat", temperature=0)["x-gateway-cache"] == "hit"
    with django_capture_on_commit_callbacks(execute=True):
        model_rollback(alias="chat", actor="test")

    resp = post(client, key.secret, "chat", temperature=0)

    assert (resp["x-gateway-cache"], resp["x-gateway-model-version"]) == ("miss", OLD)


# --- rollouts ----------------------------------------------------------------------------------


def test_shares_split_gives_the_rest_to_the_other_versions_in_proportion():
    assert shares_split(["a", "b"], "b", 10) == {"b": 10, "a": 90}
    assert shares_split(["a", "b", "c"], "c", 10) == {"c": 10, "a": 45, "b": 45}
    assert shares_split(["a", "b", "c"], "c", 50, current={"a": 75, "b": 25, "c": 0}) == {"c": 50, "a": 38, "b": 12}
    assert sum(shares_split(["a", "b", "c", "d"], "d", 1).values()) == 100
    with pytest.raises(RolloutError, match="only version"):
        shares_split(["a"], "a", 10)
    with pytest.raises(RolloutError, match="unknown version"):
        shares_split(["a", "b"], "z", 10)


def test_ten_percent_rollout_lands_within_binomial_bounds_over_1000_requests(client, chat, key):
    model_rollout(alias="chat", version=NEW, share=10, actor="test")
    version_rng_seed(20261127)  # reproducible; the bound below holds for any seed but once in 10^9 runs
    n, p = 1000, 0.10

    for _ in range(n):
        assert post(client, key.secret, "chat").status_code == 200

    got = versions_of_ledger().count(NEW)
    bound = 6 * math.sqrt(n * p * (1 - p))  # six standard deviations: P(outside) < 2e-9
    print(f"rollout 10%: {got} of {n} requests to the new version (bound ±{bound:.0f})")
    assert abs(got - n * p) <= bound, (got, bound)
    assert len(UsageEvent.objects.filter(model_version=OLD)) == n - got


def test_a_version_at_share_zero_gets_no_traffic_and_no_fallbacks(client, chat, key):
    model_rollout(alias="chat", version=NEW, share=0, actor="test")

    for _ in range(30):
        post(client, key.secret, "chat")

    assert set(versions_of_ledger()) == {OLD}
    assert all(a["model"] == "gpt-old" for e in UsageEvent.objects.all() for a in e.attempts)


def test_rollout_and_rollback_by_command_are_audited(client, chat, key):
    out = StringIO()
    call_command("model_rollout", "chat", NEW, "--share", "10", stdout=out)
    assert out.getvalue().splitlines() == [f"chat@{OLD}\t90%", f"chat@{NEW}\t10%"]
    call_command("model_rollout", "chat", NEW, "--share", "50", stdout=StringIO())
    assert ModelAlias.objects.get(alias="chat").version_shares == {NEW: 50, OLD: 50}

    out = StringIO()
    call_command("model_rollback", "chat", stdout=out)

    assert ModelAlias.objects.get(alias="chat").version_shares == {NEW: 0, OLD: 100}
    audit = list(AuditLog.objects.filter(object_type="modelalias").order_by("id").values_list(
        "action", "actor", "before", "after"))
    assert [a[0] for a in audit] == ["rollout", "rollout", "rollback"]
    assert audit[0][1].startswith("cli")
    assert audit[2][2] == {"shares": {NEW: 50, OLD: 50}, "version": NEW}
    assert audit[2][3] == {"shares": {NEW: 0, OLD: 100}}
    for _ in range(20):
        post(client, key.secret, "chat")
    assert set(versions_of_ledger()) == {OLD}
    with pytest.raises(CommandError, match="no rollout to roll back"):
        call_command("model_rollback", "chat")


def test_rollback_after_a_completed_rollout_returns_to_the_previous_version(chat):
    model_rollout(alias="chat", version=NEW, share=5, actor="test")
    model_rollout(alias="chat", version=NEW, share=100, actor="test")

    assert model_rollback(alias="chat", actor="test") == {NEW: 0, OLD: 100}


def test_rollout_refuses_unknown_versions_and_aliases(chat):
    with pytest.raises(CommandError, match="unknown version"):
        call_command("model_rollout", "chat", "1999-01-01", "--share", "10")
    with pytest.raises(CommandError, match="unknown model alias"):
        call_command("model_rollout", "nope", NEW, "--share", "10")
    with pytest.raises(CommandError, match="from 0 to 100"):
        call_command("model_rollout", "chat", NEW, "--share", "101")
    assert not AuditLog.objects.filter(action="rollout").exists()


CONFIG = """
providers:
  - {name: mock, kind: mock}
models:
  - alias: chat
    deployments:
      - {provider: mock, model: gpt-old, version: "2024-05-13"}
      - {provider: mock, model: gpt-new, version: "2024-08-06"}
    rollout: {version: "2024-08-06", share: 10}
"""


def test_gateway_apply_sets_the_rollout_idempotently():
    config_apply(cfg=config_parse(CONFIG), actor="cli:test")
    config_apply(cfg=config_parse(CONFIG), actor="cli:test")

    assert ModelAlias.objects.get(alias="chat").version_shares == {NEW: 10, OLD: 90}
    assert AuditLog.objects.filter(action="rollout").count() == 1
    assert model_rollback(alias="chat", actor="test") == {NEW: 0, OLD: 100}


def test_gateway_apply_names_a_rollout_of_an_unknown_version():
    with pytest.raises(ConfigError) as exc:
        config_parse(CONFIG.replace('rollout: {version: "2024-08-06"', 'rollout: {version: "2030-01-01"'))
    assert exc.value.errors == ["models[0].rollout.version: '2030-01-01' is not a version of 'chat' "
                                "(versions: 2024-05-13, 2024-08-06)"]


def test_admin_rolls_out_and_back(admin_client, chat):
    change = f"/admin/gateway/modelalias/{chat.id}/change/"
    deployments = list(chat.deployments.order_by("id"))
    form = {"alias": "chat", "strategy": "weighted", "context_window": 128000, "max_output_tokens": 16384,
            "supports_streaming": "on", "supports_embeddings": "unknown", "supports_chat": "unknown",
            "rollout_to": NEW, "rollout_share": 5,
            "deployments-TOTAL_FORMS": len(deployments), "deployments-INITIAL_FORMS": len(deployments),
            "deployments-MIN_NUM_FORMS": 0, "deployments-MAX_NUM_FORMS": 1000}
    for i, d in enumerate(deployments):
        form.update({f"deployments-{i}-id": d.id, f"deployments-{i}-alias": chat.id,
                     f"deployments-{i}-provider": d.provider_id, f"deployments-{i}-upstream_model": d.upstream_model,
                     f"deployments-{i}-version": d.version, f"deployments-{i}-priority": 0,
                     f"deployments-{i}-weight": 1, f"deployments-{i}-is_active": "on"})

    resp = admin_client.post(change, form)

    assert resp.status_code == 302, resp.content.decode()[:3000]
    assert ModelAlias.objects.get(alias="chat").version_shares == {NEW: 5, OLD: 95}
    assert AuditLog.objects.get(action="rollout").actor.startswith("admin:")
    assert f"{NEW} 5%" in admin_client.get("/admin/gateway/modelalias/").content.decode()

    admin_client.post("/admin/gateway/modelalias/", {"action": "rollback", "_selected_action": [chat.id]})

    assert ModelAlias.objects.get(alias="chat").version_shares == {NEW: 0, OLD: 100}
    assert AuditLog.objects.get(action="rollback").actor.startswith("admin:")


# --- the version that answered, everywhere ----------------------------------------------------


def test_the_version_is_on_the_ledger_row_the_exports_and_the_request_log(client, chat, key):
    RequestLogPolicy.objects.create(tenant=key.tenant, bodies=False)
    manager = member(key.tenant, Role.MANAGER, "mia-manager")

    resp = post(client, key.secret, f"chat@{NEW}")

    request_id = resp["x-request-id"]
    assert UsageEvent.objects.get(request_id=request_id).model_version == NEW
    assert RequestLog.objects.get(request_id=request_id).model_version == NEW
    client.force_login(manager)
    rows = list(csv.DictReader(io.StringIO(b"".join(client.get("/dashboard/usage.csv").streaming_content).decode())))
    assert [(r["request_id"], r["model"], r["model_version"]) for r in rows] == [(request_id, "chat", NEW)]
    assert client.get(f"/api/request-logs/{request_id}/").json()["model_version"] == NEW
    assert f"chat@{NEW}" in client.get("/dashboard/requests/").content.decode()
    assert f"chat@{NEW}" in client.get(f"/dashboard/requests/{request_id}/").content.decode()
    out = StringIO()
    call_command("usage_export", "--tenant", key.tenant.slug, "--format", "json", stdout=out)
    assert json.loads(out.getvalue().splitlines()[0])["model_version"] == NEW
