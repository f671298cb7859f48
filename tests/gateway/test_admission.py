"""Admission: rate limits and budget holds, through the Django test client (one instance)."""

from decimal import Decimal

import orjson
import pytest
from django.test import override_settings

from apps.analytics.models import UsageEvent
from apps.core import state as core_state
from tests import factories as f

pytestmark = pytest.mark.django_db


def post(client, secret, body):
    return client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


def chat(alias, content="hi", **extra):
    return {"model": alias, "messages": [{"role": "user", "content": content}], **extra}


def test_key_rpm_counts_down_then_refuses_with_retry_after(client, setup):
    setup.key.rpm = 3
    setup.key.save()

    answers = [post(client, setup.secret, chat(setup.alias)) for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a["x-ratelimit-remaining-requests"] for a in answers[:3]] == ["2", "1", "0"]
    assert answers[0]["x-ratelimit-limit-requests"] == "3"
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert f"key '{setup.key.name}'" in refused.json()["error"]["message"]
    assert int(refused["retry-after"]) >= 1
    assert UsageEvent.objects.filter(status=429).count() == 1


def test_tenant_and_source_limits_apply_to_every_key(client, setup):
    f.RateLimitFactory(tenant=setup.tenant, scope="source", scope_value=setup.source.name, rpm=2)
    other_key = f.ApiKeyFactory(tenant=setup.tenant, source=setup.source)

    codes = [post(client, k, chat(setup.alias)).status_code for k in (setup.secret, other_key.secret, setup.secret)]

    assert codes == [200, 200, 429]


def test_tpm_is_charged_the_prompt_estimate_and_refuses_oversized_requests(client, setup):
    setup.key.tpm = 50
    setup.key.save()

    small = post(client, setup.secret, chat(setup.alias, "short"))
    huge = post(client, setup.secret, chat(setup.alias, "word " * 400))

    assert small.status_code == 200
    assert int(small["x-ratelimit-remaining-tokens"]) < 50
    assert huge.status_code == 429 and "more than the tokens per minute" in huge.json()["error"]["message"]


def test_low_priority_requests_leave_headroom(client, setup):
    setup.key.rpm = 10
    setup.key.save()

    low = [post(client, setup.secret, chat(setup.alias, metadata={"priority": 1})).status_code for _ in range(10)]
    high = [post(client, setup.secret, chat(setup.alias, metadata={"priority": 9})).status_code for _ in range(3)]

    assert low.count(200) == 8  # 80% of the limit
    assert high == [200, 200, 429]


def test_hard_budget_refuses_with_402_naming_budget_and_reset(client, setup):
    setup.tenant.timezone = "Europe/Berlin"
    setup.tenant.save()
    f.BudgetFactory(tenant=setup.tenant, name="tiny", limit_usd=Decimal("0.0001"), period="daily")

    resp = post(client, setup.secret, chat(setup.alias, max_tokens=100))

    assert resp.status_code == 402
    err = resp.json()["error"]
    assert err["code"] == "budget_exceeded"
    assert "Budget 'tiny'" in err["message"] and "resets at" in err["message"] and "+01:00" in err["message"]
    assert "of $0.0001 (daily)" in err["message"]  # a sub-cent limit is not shown as $0.00
    assert resp["x-gateway-budget"] == "tiny"


def test_budget_counter_is_rebuilt_from_the_ledger(client, setup):
    f.BudgetFactory(tenant=setup.tenant, name="monthly", limit_usd=Decimal("1.00"))
    f.UsageEventFactory(tenant=setup.tenant, cost=Decimal("0.9999"))

    resp = post(client, setup.secret, chat(setup.alias, max_tokens=200))

    assert resp.status_code == 402


def test_budget_scopes_match_source_key_and_budget_id(client, setup):
    other_source = f.SourceFactory(tenant=setup.tenant)
    f.BudgetFactory(tenant=setup.tenant, scope="source", scope_value=other_source.name, limit_usd=Decimal("0.00001"))
    f.BudgetFactory(tenant=setup.tenant, scope="budget_id", scope_value="proj-x", limit_usd=Decimal("0.00001"))

    unrelated = post(client, setup.secret, chat(setup.alias, max_tokens=10))
    tagged = post(client, setup.secret, chat(setup.alias, max_tokens=10, metadata={"budget_id": "proj-x"}))

    assert unrelated.status_code == 200
    assert tagged.status_code == 402


def test_soft_budget_never_refuses(client, setup):
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.000001"), enforcement="soft")

    assert post(client, setup.secret, chat(setup.alias, max_tokens=10)).status_code == 200


def test_hold_is_released_when_the_upstream_fails(client, setup):
    # Room for exactly one hold at a time.
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.00015"))
    setup.deployment.upstream_model = "fail-500"
    setup.deployment.save()
    assert post(client, setup.secret, chat(setup.alias, max_tokens=50)).status_code == 502

    setup.deployment.upstream_model = "gpt-up"
    setup.deployment.save()
    from apps.gateway import selectors

    selectors.routing_table_invalidate()
    assert post(client, setup.secret, chat(setup.alias, max_tokens=50)).status_code == 200


def test_spend_settles_to_actual_cost_not_the_hold(client, setup):
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.0003"))

    codes = [post(client, setup.secret, chat(setup.alias, max_tokens=100)).status_code for _ in range(6)]

    # each hold is ~0.00022 but each request costs ~0.00001: sequential requests all fit
    assert codes == [200] * 6
    assert sum(e.cost for e in UsageEvent.objects.all()) < Decimal("0.0003")


def test_shrink_lowers_max_tokens_to_fit_the_budget(client, setup, upstream):
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.0001"), shrink_max_tokens=True)

    resp = post(client, setup.secret, chat(setup.alias, max_tokens=1000))

    assert resp.status_code == 200
    sent = upstream.requests[-1]["body"]["max_tokens"]
    assert 1 <= sent < 1000
    assert resp["x-gateway-max-tokens-lowered"] == str(sent)


def test_hard_budget_without_max_tokens_caps_the_upstream_at_the_model_limit(client, setup, upstream):
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("10"))

    post(client, setup.secret, chat(setup.alias))

    assert upstream.requests[-1]["body"]["max_tokens"] == 16_384


@pytest.fixture
def unreachable_state(shared_state_at):
    with shared_state_at("redis://127.0.0.1:1/0"):
        yield


def test_state_unreachable_rate_limits_fail_open_and_say_so(client, setup, unreachable_state):
    setup.key.rpm = 1
    setup.key.save()

    codes = [post(client, setup.secret, chat(setup.alias)) for _ in range(2)]

    assert [c.status_code for c in codes] == [200, 200]
    assert codes[0]["x-gateway-admission"] == "fail-open"


def test_state_unreachable_hard_budgets_fail_closed(client, setup, unreachable_state):
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("10"))

    resp = post(client, setup.secret, chat(setup.alias))

    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "admission_unavailable"
    assert resp["x-gateway-admission"] == "fail-closed"


def test_state_unreachable_policy_is_configurable(client, setup, unreachable_state):
    setup.key.rpm = 1
    setup.key.save()

    with override_settings(GATEWAY_RATE_LIMIT_ON_STATE_ERROR="closed"):
        resp = post(client, setup.secret, chat(setup.alias))

    assert resp.status_code == 503


def test_state_that_never_answers_does_not_hang_requests(client, setup, shared_state_at):
    """A Redis that accepts connections but never replies: the short timeout applies, then the policy."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    setup.key.rpm = 5
    setup.key.save()
    try:
        with shared_state_at(f"redis://127.0.0.1:{silent.getsockname()[1]}/0"), \
                override_settings(REDIS_TIMEOUT_S=0.5):
            started = time.monotonic()
            resp = post(client, setup.secret, chat(setup.alias))
            waited = time.monotonic() - started
    finally:
        silent.close()

    assert resp.status_code == 200 and resp["x-gateway-admission"] == "fail-open"
    # One wait budget per request: every Redis call of the request (cooldowns, admission) together
    # waited at most REDIS_TIMEOUT_S (plus scheduling slack), not once per call.
    assert waited < 1.0  # before: a timeout per call (cooldown check, then twice the timeout for admission)


def test_a_crashed_requests_hold_expires_and_a_late_settle_counts_once(monkeypatch):
    import asyncio
    import time
    import types

    from apps.core.state import BudgetCell, state

    backend, key, now = core_state.state(), "llms:bud:test:expiry", [time.time()]
    monkeypatch.setattr(core_state, "time", types.SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic))

    def cell():
        return BudgetCell(key=key, limit_micros=100, hold_micros=80, hard=True, ttl_s=3600)

    async def scenario():
        await backend.set_spent(key=key, micros=0, ttl_s=3600)
        assert (await backend.admit(request_id="a", limits=[], budgets=[cell()], hold_ttl_s=60)).ok
        assert not (await backend.admit(request_id="b", limits=[], budgets=[cell()], hold_ttl_s=60)).ok
        now[0] += 61  # a's process is gone: its hold expires
        assert (await backend.admit(request_id="b", limits=[], budgets=[cell()], hold_ttl_s=60)).ok
        # a settles late after all: its actual cost counts once, and b's hold is untouched
        assert await backend.settle(request_id="a", limits=[], budgets=[(cell(), 30)]) == [(0, 30)]
        return await backend.usage(keys=[key])

    assert state() is backend
    assert asyncio.run(scenario()) == [(30, 80)]


def test_the_hold_covers_tool_definitions_billed_as_prompt(client, setup):
    """Providers bill tool definitions (and tool calls in the history) as prompt tokens: the hold's
    prompt bound must include them, or a hard budget could be passed by requests with large tools."""
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.001"))  # room for "hi" (~$0.00004), not 2 KB more
    tool = {"type": "function", "function": {"name": "lookup", "description": "x " * 1000,
                                             "parameters": {"type": "object", "properties": {}}}}

    assert post(client, setup.secret, chat(setup.alias, max_tokens=10)).status_code == 200
    resp = post(client, setup.secret, chat(setup.alias, max_tokens=10, tools=[tool]))

    assert resp.status_code == 402
    assert resp.json()["error"]["code"] == "budget_exceeded"


def test_hold_bounds_an_image_prompt_not_just_its_url(client, setup):
    # An image URL is a few bytes, but the image counts thousands of prompt tokens: a budget that
    # cannot take them refuses, instead of letting the actual cost pass the hold.
    setup.price.input_usd_per_mtok = Decimal("1")
    setup.price.save()
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.01"))
    image = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]

    assert post(client, setup.secret, chat(setup.alias, max_tokens=10)).status_code == 200
    assert post(client, setup.secret, {"model": setup.alias, "max_tokens": 10,
                                       "messages": [{"role": "user", "content": image}]}).status_code == 402


def test_hold_counts_tool_definitions():
    from apps.gateway.tokens import prompt_bytes

    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object",
              "properties": {"q": {"type": "string", "description": "x" * 5000}}}}}]

    assert prompt_bytes(messages, [tools]) > prompt_bytes(messages) + 5000


@pytest.fixture
def private_redis(shared_state_at):
    """A Redis server of this test's own, so the test can stop it while requests run."""
    import shutil
    import socket
    import subprocess
    import time

    import redis

    if not shutil.which("redis-server"):
        pytest.skip("needs redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=0.2).ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)
    with shared_state_at(url):
        yield proc
    proc.kill()
    proc.wait()


def test_redis_stopped_during_requests_applies_the_policy_and_nobody_waits(client, setup, private_redis):
    import time

    setup.key.rpm = 100
    setup.key.save()
    f.BudgetFactory(tenant=setup.tenant, name="soft-one", limit_usd=Decimal("10"), enforcement="soft")

    before = post(client, setup.secret, chat(setup.alias))
    private_redis.kill()
    private_redis.wait()
    started = time.monotonic()
    during = post(client, setup.secret, chat(setup.alias))
    with override_settings(GATEWAY_RATE_LIMIT_ON_STATE_ERROR="closed"):
        closed = post(client, setup.secret, chat(setup.alias))
    waited = time.monotonic() - started

    assert before.status_code == 200
    assert before["x-ratelimit-remaining-requests"] == "99"
    assert during.status_code == 200
    assert during["x-gateway-admission"] == "fail-open"  # the answer says what happened
    assert closed.status_code == 503
    assert closed["x-gateway-admission"] == "fail-closed"
    assert waited < 10  # two requests, each bounded by REDIS_TIMEOUT_S: no hang
    assert UsageEvent.objects.filter(status=200).count() == 2  # nothing lost from the ledger


def test_a_settle_while_the_counter_is_rebuilt_is_not_lost():
    """A rebuild reads the ledger, then sets the counter: a request that settles in between (its
    row written after the read) finds no counter. Its cost is kept and added, so the counter is
    never below the ledger (Redis failover drill: tests/billing/test_redis_failover_drill.py)."""
    import asyncio

    from apps.core.state import BudgetCell, tenant_key

    backend, key = core_state.state(), tenant_key(1, "bud", "test", "rebuild")
    cell = BudgetCell(key=key, limit_micros=1000, hold_micros=100, hard=True, ttl_s=3600)

    async def rebuild_with_a_settle_in_between():
        # "late" was admitted (its hold taken), then the counter was lost (a failover)
        assert (await backend.admit(request_id="late", limits=[], budgets=[cell], hold_ttl_s=60)).reason == "rebuild"
        await backend.rebuild_begin(keys=[key])
        ledger_read = 500  # what the ledger said, without "late" (its row is written after the read)
        assert await backend.settle(request_id="late", limits=[], budgets=[(cell, 70)]) == [(-1, -1)]
        await backend.set_spent(key=key, micros=ledger_read, ttl_s=3600)
        return await backend.usage(keys=[key])

    async def without_a_rebuild_under_way():
        other = tenant_key(1, "bud", "test", "other")
        assert await backend.settle(request_id="x", limits=[], budgets=[(BudgetCell(
            key=other, limit_micros=1000, hold_micros=0, hard=True, ttl_s=3600), 70)]) == [(-1, -1)]
        await backend.set_spent(key=other, micros=500, ttl_s=3600)  # the ledger already has it
        return await backend.usage(keys=[other])

    assert asyncio.run(rebuild_with_a_settle_in_between()) == [(570, 0)]
    assert asyncio.run(without_a_rebuild_under_way()) == [(500, 0)]
