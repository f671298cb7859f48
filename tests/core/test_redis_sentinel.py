"""Redis behind Sentinel (`redis+sentinel://`), against a real master, replica and Sentinel started
here on loopback (redis-server, and redis-server in sentinel mode): the admission state's client,
the cache and the Celery broker all reach the master the Sentinel names, and a failover (the master
killed) moves them to the promoted replica, whose new run id triggers the budget counters' rebuild."""

import asyncio
import os
import signal
import subprocess
import time

import pytest

from apps.core import caches
from apps.core import redis as core_redis
from apps.core.redis_url import celery_broker, django_cache, sentinel_url
from apps.core.state import EPOCH_KEY
from tests.redis_servers import REDIS_SERVER, SentinelSet, free_port, needs_redis_server, poll

pytestmark = needs_redis_server
_free_port, _poll = free_port, poll


@pytest.fixture
def sentinels(tmp_path):
    s = SentinelSet(tmp_path)
    try:
        yield s.start()
    finally:
        s.stop()


def test_the_url_is_parsed():
    s = sentinel_url("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380,sentinel-3/mymaster/2?sentinel_password=sp")
    assert s.hosts == (("10.0.0.1", 26379), ("::1", 26380), ("sentinel-3", 26379))
    assert (s.service, s.db, s.password, s.sentinel_password) == ("mymaster", 2, "pw", "sp")
    assert sentinel_url("redis://127.0.0.1:6379/0") is None
    with pytest.raises(ValueError, match="service"):
        sentinel_url("redis+sentinel://127.0.0.1:26379")
    url, options = celery_broker("redis+sentinel://:pw@h1:26379,h2:26380/mymaster/1")
    assert url == "sentinel://:pw@h1:26379/1;sentinel://:pw@h2:26380/1"
    assert options == {"master_name": "mymaster"}


def test_cache_broker_and_blocking_client_reach_the_master(sentinels, settings):
    """The three users of a Redis URL besides the admission state."""
    from django_redis.cache import RedisCache
    from kombu import Connection

    core_redis.sync_client_for(sentinels.url()).set("plain", "1")
    assert sentinels.client(sentinels.master_port).get("plain") == b"1"

    settings.DJANGO_REDIS_CONNECTION_FACTORY = "django_redis.pool.SentinelConnectionFactory"
    conf = django_cache(sentinels.url(1), 2.0)
    cache = RedisCache(conf["LOCATION"], {k: v for k, v in conf.items() if k != "LOCATION"})
    cache.set("greeting", {"hello": "world"}, 60)
    assert cache.get("greeting") == {"hello": "world"}
    assert sentinels.client(sentinels.master_port).execute_command("SELECT", 1)

    url, options = celery_broker(sentinels.url(2))
    with Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue("sentinel-test")
        queue.put({"task": "ping"})
        message = queue.get(timeout=5)
        assert message.payload == {"task": "ping"}
        message.ack()
        queue.close()
    assert sentinels.client(sentinels.master_port).execute_command("SELECT", 2)


@pytest.mark.django_db(transaction=True)
def test_a_failover_moves_the_admission_state_to_the_new_master_and_rebuilds_budget_counters(sentinels, settings):
    settings.REDIS_URL = sentinels.url()
    settings.REDIS_RETRY_AFTER_S = 0.0
    caches.reset_all()
    seen = []

    async def listener(run_id, previous, conn):
        seen.append((run_id, previous))

    core_redis.on_new_server(listener)
    master_id = sentinels.client(sentinels.master_port).info("server")["run_id"]
    replica_id = sentinels.client(sentinels.replica_port).info("server")["run_id"]

    async def scenario():
        client = core_redis.client()
        await core_redis.run(lambda: client.set("llms:test:k", "v"))
        # the billing listener validated the master: the counters are marked as kept there
        assert await core_redis.run(lambda: client.get(EPOCH_KEY)) == master_id.encode()
        assert sentinels.client(sentinels.master_port).wait(1, 2000) == 1  # replicated

        sentinels.kill("master")
        await asyncio.to_thread(_poll, lambda: sentinels.master_port_now() == sentinels.replica_port,
                                "the Sentinel to promote the replica")

        deadline = time.monotonic() + 30
        while True:  # the first calls may meet the dead master's connections: bounded retries
            try:
                value = await core_redis.run(lambda: client.get("llms:test:k"))
                break
            except core_redis.StateUnavailable:
                assert time.monotonic() < deadline, "the client never reached the new master"
                await asyncio.sleep(0.05)
        assert value == b"v"
        # the promoted replica had the old master's epoch: the budget counters were rebuilt for it
        assert await core_redis.run(lambda: client.get(EPOCH_KEY)) == replica_id.encode()
        await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        core_redis._listeners.remove(listener)
        caches.reset_all()
    assert seen[0][0] == master_id
    assert (replica_id, master_id) in seen


@pytest.mark.django_db(transaction=True)
def test_a_restarted_server_is_noticed_on_reconnect(tmp_path, settings):
    """The run-id check runs on every new connection with the installed redis-py (whose `connect`
    calls `on_connect_check_health`, not `on_connect`): a restarted server is a new server."""
    port = _free_port()
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start():
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                cwd=tmp_path)
        _poll(lambda: SentinelSet.client(port).ping(), "redis-server to answer")
        return proc, SentinelSet.client(port).info("server")["run_id"]

    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    settings.REDIS_RETRY_AFTER_S = 0.0
    caches.reset_all()
    seen = []

    async def listener(run_id, previous, conn):
        seen.append((run_id, previous))

    core_redis.on_new_server(listener)
    proc, first_id = start()
    try:
        async def call():
            deadline = time.monotonic() + 30
            while True:
                try:
                    return await core_redis.run(lambda: core_redis.client().ping())
                except core_redis.StateUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)

        async def scenario():
            nonlocal proc
            await call()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc, second_id = start()
            await call()
            return second_id

        second_id = asyncio.run(scenario())
    finally:
        core_redis._listeners.remove(listener)
        caches.reset_all()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert seen == [(first_id, None), (second_id, first_id)]
