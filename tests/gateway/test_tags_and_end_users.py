"""Tags (`metadata.tags`) and end users (OpenAI's `user`): validated, on the ledger row, and
enforced by `tag:<name>` and `user:<id>` / `user:*` budgets and rate limits in the one admission
round trip."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import orjson
import pytest

from apps.analytics.models import UsageEvent
from apps.billing.budgets import open_holds
from apps.gateway import schemas
from apps.gateway.selectors import routing_table_invalidate
from tests import factories as f

pytestmark = pytest.mark.django_db


def post(client, secret, body, path="/v1/chat/completions"):
    return client.post(path, data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


def chat(alias, content="hi", **extra):
    return {"model": alias, "messages": [{"role": "user", "content": content}], **extra}


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tags", "param", "words"), [
    ([f"t{i}" for i in range(schemas.MAX_TAGS + 1)], "metadata.tags", "at most 10"),
    (["ok", "x" * (schemas.MAX_TAG_LENGTH + 1)], "metadata.tags[1]", "at most 64 characters"),
    ("support", "metadata.tags", "valid list"),
    (["ok", 7], "metadata.tags[1]", "valid string"),
    (["bad\ttab"], "metadata.tags[0]", "control characters"),
    (["line\nbreak"], "metadata.tags[0]", "control characters"),
    ([""], "metadata.tags[0]", "at least 1 character"),
])
def test_bad_tags_are_an_openai_shaped_400_naming_the_field(client, setup, tags, param, words):
    resp = post(client, setup.secret, chat(setup.alias, metadata={"tags": tags}))

    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert words in err["message"]
    assert not UsageEvent.objects.filter(status=200).exists()


@pytest.mark.parametrize(("user", "words"), [
    (42, "valid string"), ("ctl\x01", "control characters"), ("u" * (schemas.MAX_END_USER_LENGTH + 1), "at most 256"),
])
def test_bad_user_is_an_openai_shaped_400(client, setup, user, words):
    resp = post(client, setup.secret, chat(setup.alias, user=user))

    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "user" and words in err["message"]


def test_seed_envelope_tags_errors_name_the_envelope_field(client, setup):
    body = {"request": {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}],
                        "metadata": {"tags": "not-a-list"}}}

    resp = post(client, setup.secret, body, path="/v1/requests")

    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "request.metadata.tags"


def test_tags_and_user_are_on_the_ledger_row_and_user_still_goes_upstream(client, setup, upstream):
    setup.deployment.alias.supports_embeddings = True
    setup.deployment.alias.save()

    resp = post(client, setup.secret, chat(setup.alias, user="alice", metadata={"tags": ["support", "eu", "support"]}))
    sent = upstream.requests[-1]["body"]
    emb = post(client, setup.secret, {"model": setup.alias, "input": "x", "user": "bob",
                                      "metadata": {"tags": ["batch-job"]}}, path="/v1/embeddings")

    assert (resp.status_code, emb.status_code) == (200, 200)
    row = UsageEvent.objects.get(request_id=resp["x-request-id"])
    assert row.tags == ["support", "eu"]  # duplicates dropped, order kept
    assert row.end_user == "alice"
    assert sent["user"] == "alice" and "metadata" not in sent
    erow = UsageEvent.objects.get(request_id=emb["x-request-id"])
    assert (erow.tags, erow.end_user) == (["batch-job"], "bob")


def test_a_request_without_tags_or_user_records_empty_values(client, setup):
    resp = post(client, setup.secret, chat(setup.alias))

    row = UsageEvent.objects.get(request_id=resp["x-request-id"])
    assert (row.tags, row.end_user) == ([], "")


# --- budgets --------------------------------------------------------------------------------------


def test_a_hard_tag_budget_refuses_once_spent_like_any_budget(client, setup):
    f.BudgetFactory(tenant=setup.tenant, name="support-tag", scope="tag", scope_value="support",
                    limit_usd=Decimal("0.00005"), period="daily")
    body = chat(setup.alias, max_tokens=5, metadata={"tags": ["support"]})

    answers = [post(client, setup.secret, body) for _ in range(6)]
    untagged = post(client, setup.secret, chat(setup.alias, max_tokens=5, metadata={"tags": ["sales"]}))

    codes = [a.status_code for a in answers]
    assert codes[0] == 200 and codes[-1] == 402
    assert set(codes) == {200, 402} and codes == sorted(codes)  # refused only once spent
    refused = answers[-1]
    err = refused.json()["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
    assert "Budget 'support-tag' for tag 'support' is exhausted" in err["message"] and "resets at" in err["message"]
    assert refused["x-gateway-budget"] == "support-tag"
    assert untagged.status_code == 200
    spent = sum(r.cost for r in UsageEvent.objects.filter(tags__has_tag="support", status=200))
    assert spent <= Decimal("0.00005")


def test_a_per_end_user_budget_gives_each_end_user_of_one_key_their_own(client, setup):
    f.BudgetFactory(tenant=setup.tenant, name="per-user", scope="user", scope_value="*",
                    limit_usd=Decimal("0.00005"), period="monthly")

    def until_refused(user):
        codes = []
        for _ in range(10):
            codes.append(post(client, setup.secret, chat(setup.alias, max_tokens=5, user=user)).status_code)
            if codes[-1] == 402:
                break
        return codes

    alice, bob = until_refused("alice"), until_refused("bob")
    anonymous = post(client, setup.secret, chat(setup.alias, max_tokens=5))

    assert alice[-1] == 402 and bob[-1] == 402
    assert alice.count(200) == bob.count(200) >= 1  # bob was not refused because alice spent hers
    assert anonymous.status_code == 200  # no end user: the per-end-user budget does not apply
    for user in ("alice", "bob"):
        assert sum(r.cost for r in UsageEvent.objects.filter(end_user=user, status=200)) <= Decimal("0.00005")


def test_an_end_users_own_budget_replaces_the_per_end_user_one(client, setup):
    f.BudgetFactory(tenant=setup.tenant, name="per-user", scope="user", scope_value="*",
                    limit_usd=Decimal("0.00000001"))
    f.BudgetFactory(tenant=setup.tenant, name="vip", scope="user", scope_value="vip-7", limit_usd=Decimal("10"))

    vip = post(client, setup.secret, chat(setup.alias, max_tokens=5, user="vip-7"))
    other = post(client, setup.secret, chat(setup.alias, max_tokens=5, user="someone"))

    assert vip.status_code == 200
    assert other.status_code == 402
    assert "for user 'someone'" in other.json()["error"]["message"]


def test_user_budget_counters_are_rebuilt_from_the_ledger_per_end_user(client, setup):
    f.BudgetFactory(tenant=setup.tenant, name="per-user", scope="user", scope_value="*", limit_usd=Decimal("1"))
    f.UsageEventFactory(tenant=setup.tenant, end_user="carol", cost=Decimal("0.99999"))

    carol = post(client, setup.secret, chat(setup.alias, max_tokens=200, user="carol"))
    dave = post(client, setup.secret, chat(setup.alias, max_tokens=200, user="dave"))

    assert carol.status_code == 402
    assert dave.status_code == 200


def test_tag_budget_counter_is_rebuilt_from_tagged_ledger_rows(client, setup):
    f.BudgetFactory(tenant=setup.tenant, name="eu", scope="tag", scope_value="eu", limit_usd=Decimal("1"))
    f.UsageEventFactory(tenant=setup.tenant, tags=["x", "eu"], cost=Decimal("0.99999"))
    f.UsageEventFactory(tenant=setup.tenant, tags=["us"], cost=Decimal("5"))

    eu = post(client, setup.secret, chat(setup.alias, max_tokens=200, metadata={"tags": ["eu"]}))
    us = post(client, setup.secret, chat(setup.alias, max_tokens=200, metadata={"tags": ["us"]}))

    assert eu.status_code == 402
    assert us.status_code == 200


def test_v1_budget_shows_the_end_users_and_the_tags_budgets(client, setup):
    f.BudgetFactory(tenant=setup.tenant, name="per-user", scope="user", scope_value="*", limit_usd=Decimal("1"))
    f.BudgetFactory(tenant=setup.tenant, name="eu", scope="tag", scope_value="eu", limit_usd=Decimal("2"))
    post(client, setup.secret, chat(setup.alias, max_tokens=5, user="alice", metadata={"tags": ["eu"]}))
    spent = UsageEvent.objects.get(end_user="alice").cost

    plain = client.get("/v1/budget", HTTP_AUTHORIZATION=f"Bearer {setup.secret}").json()["data"]
    mine = client.get("/v1/budget?user=alice&tag=eu", HTTP_AUTHORIZATION=f"Bearer {setup.secret}").json()["data"]
    bob = client.get("/v1/budget?user=bob", HTTP_AUTHORIZATION=f"Bearer {setup.secret}").json()["data"]

    assert {b["name"] for b in plain} == set()  # neither applies to a request without tag or user
    by_name = {b["name"]: b for b in mine}
    assert by_name["per-user"]["end_user"] == "alice" and by_name["per-user"]["scope_value"] == "*"
    assert Decimal(by_name["per-user"]["spent_usd"]) >= spent > 0
    assert Decimal(by_name["eu"]["spent_usd"]) >= spent
    (bobs,) = bob
    assert bobs["end_user"] == "bob" and Decimal(bobs["spent_usd"]) == 0


# --- rate limits -------------------------------------------------------------------------------------


def test_a_tag_rate_limit_counts_only_requests_carrying_the_tag(client, setup):
    f.RateLimitFactory(tenant=setup.tenant, scope="tag", scope_value="bulk", rpm=2)

    tagged = [post(client, setup.secret, chat(setup.alias, metadata={"tags": ["bulk", "x"]})) for _ in range(3)]
    other = post(client, setup.secret, chat(setup.alias, metadata={"tags": ["x"]}))

    assert [a.status_code for a in tagged] == [200, 200, 429]
    err = tagged[-1].json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "tag 'bulk'" in err["message"]
    assert int(tagged[-1]["retry-after"]) >= 1
    assert other.status_code == 200


def test_a_per_end_user_rate_limit_gives_each_end_user_a_window_of_their_own(client, setup):
    f.RateLimitFactory(tenant=setup.tenant, scope="user", scope_value="*", rpm=2)
    f.RateLimitFactory(tenant=setup.tenant, scope="user", scope_value="batch-robot", rpm=4)

    alice = [post(client, setup.secret, chat(setup.alias, user="alice")).status_code for _ in range(3)]
    bob = [post(client, setup.secret, chat(setup.alias, user="bob")).status_code for _ in range(3)]
    robot = [post(client, setup.secret, chat(setup.alias, user="batch-robot")).status_code for _ in range(5)]
    nobody = [post(client, setup.secret, chat(setup.alias)).status_code for _ in range(3)]

    assert alice == [200, 200, 429] and bob == [200, 200, 429]
    assert robot == [200, 200, 200, 200, 429]  # its own limit, not the per-end-user one
    assert nobody == [200, 200, 200]
    refused = post(client, setup.secret, chat(setup.alias, user="alice")).json()["error"]
    assert "end user 'alice'" in refused["message"]


# --- concurrency: never overspent -------------------------------------------------------------------


async def _fire(url: str, secret: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
        return await asyncio.gather(*[
            client.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, json=b)
            for b in bodies])


def test_per_end_user_budgets_are_never_overspent_under_concurrency(live_gateway, upstream):
    from tests.conftest import make_setup

    s = make_setup(upstream)
    f.PriceFactory(model="gpt-cent", input_usd_per_mtok=Decimal("1000"), output_usd_per_mtok=Decimal("2000"))
    s2 = make_setup(upstream, alias="gpt-cent", tenant=s.tenant)  # "hi" costs $0.01 here
    f.BudgetFactory(tenant=s.tenant, name="per-user", scope="user", scope_value="*", limit_usd=Decimal("0.2"),
                    period="monthly")
    f.BudgetFactory(tenant=s.tenant, name="tag-cap", scope="tag", scope_value="capped", limit_usd=Decimal("0.15"),
                    period="monthly")
    routing_table_invalidate()
    base = {"model": s2.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    bodies = [{**base, "user": user} for user in ("alice", "bob") for _ in range(40)]
    bodies += [{**base, "user": f"u{i}", "metadata": {"tags": ["capped"]}} for i in range(40)]

    answers = asyncio.run(_fire(live_gateway, s2.secret, bodies))

    assert {a.status_code for a in answers} <= {200, 402}
    rows = UsageEvent.objects.filter(status=200)
    assert rows.count() == sum(a.status_code == 200 for a in answers)
    # Never passed. How full each gets depends on timing: requests admitted together are bounded by
    # their holds (their most expensive answer), requests admitted after others settled by the cost.
    for user in ("alice", "bob"):
        spent = sum(r.cost for r in rows.filter(end_user=user))
        assert Decimal("0.03") <= spent <= Decimal("0.2")  # each its own budget
    tagged = sum(r.cost for r in rows.filter(tags__has_tag="capped"))
    assert Decimal("0.03") <= tagged <= Decimal("0.15")
    assert any(a.status_code == 402 for a in answers[:40]) and any(a.status_code == 402 for a in answers[40:80])
    assert not open_holds()


# --- every path: the seed envelope, async work, the config file --------------------------------------


def test_the_seed_envelope_books_tags_on_a_tag_budget(client, setup):
    f.BudgetFactory(tenant=setup.tenant, name="t", scope="tag", scope_value="seed", limit_usd=Decimal("0.00000001"))
    body = {"request": {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}],
                        "options": {"max_tokens": 5}, "metadata": {"tags": ["seed"]}}}

    refused = post(client, setup.secret, body, path="/v1/requests")

    assert refused.status_code == 402
    assert UsageEvent.objects.get(request_id=refused["x-request-id"]).tags == ["seed"]


@pytest.mark.django_db(transaction=True)
def test_an_async_requests_worker_books_its_tags_and_end_user(client, setup, monkeypatch):
    from apps.gateway import async_requests, queues

    monkeypatch.setattr(queues, "publish", lambda *a, **k: None)
    f.BudgetFactory(tenant=setup.tenant, name="each", scope="user", scope_value="*", limit_usd=Decimal("1"))

    resp = post(client, setup.secret, chat(setup.alias, max_tokens=5, user="erin", metadata={"tags": ["later"]},
                                           **{"async": True}))
    assert resp.status_code == 202
    async_requests.async_request_run(request_id=resp.json()["id"])

    row = UsageEvent.objects.get(status=200)
    assert (row.tags, row.end_user) == (["later"], "erin")
    status = client.get("/v1/budget?user=erin", HTTP_AUTHORIZATION=f"Bearer {setup.secret}").json()["data"]
    assert Decimal(status[0]["spent_usd"]) >= row.cost > 0 and Decimal(status[0]["held_usd"]) == 0


def test_the_config_file_takes_tag_and_user_scopes():
    from apps.gateway.config_schema import ConfigError, config_parse

    cfg = config_parse("""
tenants:
  - slug: acme
    name: Acme
    rate_limits: [{scope: "tag:bulk", rpm: 10}, {scope: "user:*", rpm: 5}, {scope: "user:big-co", rpm: 50}]
    budgets:
      - {name: each, scope: "user:*", limit_usd: 2}
      - {name: pilot, scope: "tag:eu-pilot", limit_usd: 50}
""")
    assert [rl.scope for rl in cfg.tenants[0].rate_limits] == ["tag:bulk", "user:*", "user:big-co"]
    with pytest.raises(ConfigError) as exc:
        config_parse("tenants: [{slug: a, name: A, budgets: [{name: x, scope: 'tags:x', limit_usd: 1}]}]")
    assert "tenants[0].budgets[0].scope" in str(exc.value.errors)
