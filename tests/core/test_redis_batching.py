"""Commands of one event-loop turn go to Redis together (apps.core.redis.send / script): one
connection, one write, one read; each caller still gets its own reply or its own error."""

import asyncio

import pytest
import redis
from django.conf import settings as django_settings

from apps.core import caches
from apps.core import redis as core_redis

pytestmark = pytest.mark.skipif(not django_settings.REDIS_URL, reason="needs REDIS_URL")

ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.fixture(autouse=True)
def _fresh_client():
    caches.reset_all()
    yield
    caches.reset_all()


def _connections_made() -> int:
    pool = core_redis.client().connection_pool
    return len(pool._available_connections) + len(pool._in_use_connections)


async def test_commands_issued_in_one_turn_share_one_connection_and_keep_their_own_replies():
    replies = await asyncio.gather(*(core_redis.run(lambda i=i: core_redis.script(ECHO, [f"k{i}"], [i]))
                                     for i in range(25)))

    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(25)]
    assert _connections_made() == 1  # 25 commands, one pipeline


async def test_a_script_the_server_forgot_is_sent_again_with_its_source():
    await core_redis.run(lambda: core_redis.script(ECHO, ["a"], [1]))
    redis.Redis.from_url(django_settings.REDIS_URL).script_flush()

    assert await core_redis.run(lambda: core_redis.script(ECHO, ["b"], [2])) == [b"b", b"2"]


async def test_one_command_failing_does_not_fail_the_others_of_its_turn():
    key = "llms:test:batching:list"
    sync = redis.Redis.from_url(django_settings.REDIS_URL)
    sync.delete(key)
    sync.rpush(key, "x")

    async def wrong_type():
        with pytest.raises(core_redis.StateUnavailable, match="ResponseError"):
            await core_redis.run(lambda: core_redis.send("GET", key))  # a list, not a string
        return "refused"

    results = await asyncio.gather(wrong_type(), core_redis.run(lambda: core_redis.send("LLEN", key)),
                                   core_redis.run(lambda: core_redis.script(ECHO, ["c"], [3])))

    assert results == ["refused", 1, [b"c", b"3"]]
    sync.delete(key)


async def test_an_unreachable_server_fails_every_command_of_the_turn(settings):
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    caches.reset_all()

    outcomes = await asyncio.gather(*(core_redis.run(lambda: core_redis.send("PING")) for _ in range(5)),
                                    return_exceptions=True)

    assert all(isinstance(o, core_redis.StateUnavailable) for o in outcomes)


@pytest.fixture
def flushes(monkeypatch):
    """The commands of every pipeline sent, by name."""
    sent: list[list[str]] = []
    real = core_redis._Batch._send

    async def recording(self, entries):
        sent.append([e[0][0] for e in entries])
        await real(self, entries)

    monkeypatch.setattr(core_redis._Batch, "_send", recording)
    return sent


async def _unhurried_echo(text: str):
    core_redis.unhurried()  # this task's commands only (a settle after its answer)
    return await core_redis.run(lambda: core_redis.send("ECHO", text))


async def test_an_unhurried_command_goes_out_with_the_next_command_of_another_task(flushes):
    later = asyncio.create_task(_unhurried_echo("late"))
    for _ in range(10):  # turns of the loop pass, and it is not sent on its own
        await asyncio.sleep(0)
    assert flushes == []

    assert await core_redis.run(lambda: core_redis.send("ECHO", "now")) == b"now"

    assert await later == b"late"
    assert flushes == [["ECHO", "ECHO"]]  # one pipeline: no send or wake-up of its own


async def test_an_unhurried_command_alone_goes_out_after_its_wait(flushes):
    assert await asyncio.create_task(_unhurried_echo("alone")) == b"alone"
    assert flushes == [["ECHO"]]
    assert not core_redis._unhurried.get()  # that task's, not this one's


async def test_a_request_resumes_before_the_unhurried_command_that_went_out_first(flushes):
    resumed: list[str] = []

    async def settle():
        await _unhurried_echo("settle")
        resumed.append("settle")

    async def admission():
        await core_redis.run(lambda: core_redis.send("ECHO", "admit"))
        resumed.append("admission")

    later = asyncio.create_task(settle())
    await asyncio.sleep(0)  # the settle's command is queued first
    await asyncio.gather(admission(), later)

    assert flushes == [["ECHO", "ECHO"]]  # one pipeline, the settle's command first in it
    assert resumed == ["admission", "settle"]
