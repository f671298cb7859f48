"""Redis Cluster (`redis+cluster://`), against a real cluster of three masters started here on
loopback (redis-server --cluster-enabled yes, redis-cli --cluster create): the gateway admits,
settles, rate-limits, caches and cools deployments down on it; every key of one admission sits in
its tenant's one slot; a replica promoted by CLUSTER FAILOVER is a new server whose budget counters
are rebuilt from the ledger; a cluster is refused as the Celery broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from asgiref.sync import async_to_sync
from redis.crc import key_slot

from apps.analytics.models import UsageEvent
from apps.core import caches
from apps.core.redis_url import celery_broker_refused, cluster_url
from apps.core.state import BudgetCell, LimitCell, RedisState, tenant_key
from apps.gateway import cooldown
from tests import factories as f
from tests.conftest import make_setup
from tests.money import spend
from tests.redis_servers import ClusterSet, needs_redis_cluster, poll
from tests.redis_servers import client as node

ROOT = Path(__file__).resolve().parents[2]


def test_the_cluster_url_is_parsed():
    c = cluster_url("redis+cluster://user:pw@10.0.0.1:7000,[::1]:7001,node-3/")
    assert c.hosts == (("10.0.0.1", 7000), ("::1", 7001), ("node-3", 6379))
    assert (c.username, c.password, c.ssl) == ("user", "pw", False)
    assert cluster_url("rediss+cluster://n1:7000").ssl
    assert cluster_url("redis://127.0.0.1:6379/0") is None
    with pytest.raises(ValueError, match="only database 0"):
        cluster_url("redis+cluster://n1:7000/2")
    with pytest.raises(ValueError, match="host:port"):
        cluster_url("redis+cluster:///")


def test_a_cluster_broker_is_refused_at_startup_with_a_clear_error():
    assert celery_broker_refused("redis+sentinel://s1:26379/mymaster/2") == ""
    assert celery_broker_refused("redis://127.0.0.1:6379/2") == ""
    env = {**os.environ, "CELERY_BROKER_URL": "redis+cluster://127.0.0.1:7000/"}
    done = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120,
                          )  # DJANGO_SETTINGS_MODULE comes from pytest's environment
    assert done.returncode != 0
    assert "Redis Cluster (redis+cluster://) is not supported as the Celery broker" in done.stderr
    assert "redis+sentinel://" in done.stderr  # says what to use instead


def test_one_admission_never_spans_two_tenants():
    """A script over two tenants' keys would be refused by a cluster (CROSSSLOT); it is refused
    before it is sent, whatever the backend."""
    mixed_limits = [LimitCell(key=tenant_key(1, "rl", "tenant", "rpm"), limit=5, cost=1)]
    mixed_budgets = [BudgetCell(key=tenant_key(2, "bud", 9, "total"), limit_micros=10, hold_micros=1, hard=True,
                                ttl_s=0)]
    with pytest.raises(ValueError, match="span hash tags"):
        async_to_sync(RedisState().admit)(request_id="r1", limits=mixed_limits, budgets=mixed_budgets, hold_ttl_s=5)
    assert {key_slot(tenant_key(7, *p).encode()) for p in [("rl", "k3", "rpm"), ("bud", 12, "2026-11")]} \
        == {key_slot(b"{t7}")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if needs_redis_cluster.args[0]:
        pytest.skip(needs_redis_cluster.kwargs["reason"])
    c = ClusterSet(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def on_cluster(cluster, settings):
    settings.REDIS_URL = cluster.url()
    settings.GATEWAY_CACHE_BACKEND = "redis"
    settings.REDIS_RETRY_AFTER_S = 0.0
    for port in cluster.ports:
        if node(port).info("replication")["role"] == "master":
            node(port).flushall()
    caches.reset_all()
    yield cluster
    caches.reset_all()


def _tenant_keys(cluster, tenant_id: int) -> dict[str, int]:
    """Every key of the tenant's admission state, and the port of the node holding it."""
    found = {}
    for port in cluster.ports:
        one_node = node(port)
        if one_node.info("replication")["role"] != "master":
            continue
        for key in one_node.scan_iter(match=f"llms:{{t{tenant_id}}}:*", count=1000):
            found[key.decode()] = port
    return found


def _post(client, secret, body):
    return client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.mark.django_db
def test_the_gateway_admits_settles_limits_and_caches_on_a_cluster(on_cluster, client, upstream):
    one = make_setup(upstream, rpm=2, tpm=100_000)
    other = f.ApiKeyFactory(tenant=f.TenantFactory(), rpm=2)  # another tenant, the same model
    f.RateLimitFactory(tenant=one.tenant, scope="tenant", rpm=50, tpm=100_000)
    f.RateLimitFactory(tenant=one.tenant, scope="source", scope_value=one.source.name, rpm=50)
    tenant_budget = f.BudgetFactory(tenant=one.tenant, name="all", limit_usd=Decimal("5"), period="monthly")
    total_budget = f.BudgetFactory(tenant=one.tenant, name="ever", limit_usd=Decimal("5"), period="total")
    body = {"model": one.alias, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20,
            "temperature": 0}

    # a cache hit is answered before admission: it takes no rate-limit slot
    first, again = _post(client, one.secret, body), _post(client, one.secret, body)
    third = _post(client, one.secret, {**body, "temperature": 1})
    refused = _post(client, one.secret, {**body, "temperature": 1})
    theirs = _post(client, other.secret, body)

    assert [first.status_code, again.status_code, third.status_code, refused.status_code] == [200, 200, 200, 429]
    assert "x-gateway-admission" not in first.headers  # admitted by the cluster, not by a fail-open policy
    assert first["x-ratelimit-limit-requests"] == "2"
    assert (first["x-gateway-cache"], again["x-gateway-cache"]) == ("miss", "hit")
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert theirs.status_code == 200 and theirs["x-gateway-cache"] == "miss"  # the cache is per tenant
    rows = UsageEvent.objects.filter(tenant=one.tenant, status=200)
    billed = sum(r.cost for r in rows)
    assert billed > 0
    assert spend(tenant_budget) == (billed, Decimal(0)) == spend(total_budget)  # settled, nothing held

    # every key of the tenant's admissions (key, source and tenant limits, both budgets) in one slot
    keys = _tenant_keys(on_cluster, one.tenant.id)
    kinds = {k.split(":")[2] + ":" + k.split(":")[3] for k in keys}
    assert {"rl:tenant", "rl:source", f"rl:k{one.key.id}", f"bud:{tenant_budget.id}",
            f"bud:{total_budget.id}"} <= kinds
    assert len({key_slot(k.encode()) for k in keys}) == 1 and len(set(keys.values())) == 1
    assert not set(keys) & set(_tenant_keys(on_cluster, other.tenant.id))


@pytest.mark.django_db
def test_deployment_cooldowns_work_on_a_cluster(on_cluster, upstream, settings):
    deployment = make_setup(upstream).deployment
    backend = cooldown.RedisBackend()

    async def fail_until_cooling():
        for _ in range(50):
            if await backend.failure_record(deployment.id):
                return await backend.cooling([deployment.id])
        return {}

    assert deployment.id in async_to_sync(fail_until_cooling)()


@pytest.mark.django_db(transaction=True)
def test_a_promoted_replica_is_a_new_server_whose_budget_counters_are_rebuilt(failover_cluster, client, upstream,
                                                                             settings):
    cluster = failover_cluster
    settings.REDIS_URL = cluster.url()
    settings.REDIS_RETRY_AFTER_S = 0.0
    caches.reset_all()
    s = make_setup(upstream)
    budget = f.BudgetFactory(tenant=s.tenant, limit_usd=Decimal("5"), period="total")
    body = {"model": s.alias, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}
    try:
        assert _post(client, s.secret, body).status_code == 200
        billed = UsageEvent.objects.get(tenant=s.tenant).cost
        spent_key = next(k for k in _tenant_keys(cluster, s.tenant.id) if k.endswith(":spent"))
        master = cluster.node_of(spent_key)
        replica = cluster.replica_of(master)
        # the counter goes wrong on the master (and its replica): only a rebuild from the ledger fixes it
        node(master).set(spent_key, 0)
        assert node(master).wait(1, 2000) == 1
        new_run_id = node(replica).info("server")["run_id"]

        node(replica).execute_command("CLUSTER", "FAILOVER")
        poll(lambda: node(replica).info("replication")["role"] == "master", "the replica to take over")
        poll(lambda: cluster.node_of(spent_key) == replica, "the slot map to name the promoted replica")

        def second_request():
            answer = _post(client, s.secret, body)
            return answer if answer.status_code == 200 else None

        poll(second_request, "a request admitted by the promoted replica")
        assert spend(budget)[0] == sum(r.cost for r in UsageEvent.objects.filter(tenant=s.tenant)) == 2 * billed
        epochs = [k for k in node(replica).scan_iter(match="llms:state:epoch*")]
        assert [node(replica).get(k).decode() for k in epochs] == [new_run_id]
    finally:
        caches.reset_all()


def test_a_connection_closed_under_redis_py_is_unavailable_state_but_our_own_bug_is_not(settings):
    """During a cluster failover redis-py may close a connection another task is opening; the
    AttributeError on its missing writer (raised inside redis-py) is a lost connection, answered as
    `StateUnavailable` (503), not a 500. The same error from our code stays a bug."""
    from redis import crc

    from apps.core import redis as core_redis

    settings.REDIS_RETRY_AFTER_S = 0.0

    async def lost():
        crc.key_slot(None)  # an AttributeError raised inside redis-py, as on the missing writer

    async def ours():
        raise AttributeError("a bug of ours")

    async def scenario():
        with pytest.raises(core_redis.StateUnavailable):
            await core_redis.run(lost)
        with pytest.raises(AttributeError, match="a bug of ours"):
            await core_redis.run(ours)

    caches.reset_all()
    asyncio.run(scenario())
    caches.reset_all()
