"""The ledger write: group commit on PostgreSQL's async pool (the ASGI server's loop), the ORM
everywhere else. Each request's row is committed before its call returns. (The default writer
journals first and commits after: tests/analytics/test_ledger_journal_first.py.)"""

import asyncio
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from apps.analytics import journal, services
from apps.analytics.models import UsageEvent
from apps.analytics.services import usage_event_record
from apps.core import db
from tests import factories as f

postgres_only = pytest.mark.skipif(not settings.IS_POSTGRES, reason="the async pool is PostgreSQL's")


@pytest.fixture(autouse=True)
def batch_writer(settings):
    settings.GATEWAY_LEDGER_WRITER = "batch"


def row(tenant, request_id, **extra):
    return {"request_id": request_id, "timestamp": timezone.now(), "tenant_id": tenant.id, "api_key_id": None,
            "source_id": None, "source_type": "application", "source_ref": "app", "model": "m", "status": 200,
            "cost": Decimal("0.0000123400"), **extra}


@postgres_only
@pytest.mark.django_db(transaction=True)
async def test_concurrent_rows_are_each_written_once(server_loop):
    tenant = await sync_to_async(f.TenantFactory)()
    ids = [f"req_{i}" for i in range(40)]

    await asyncio.gather(*(usage_event_record(**row(tenant, rid, prompt_tokens=i)) for i, rid in enumerate(ids)),
                         usage_event_record(**row(tenant, "req_3", prompt_tokens=999)))

    assert await db.pg_pool() is not None
    events = {e.request_id: e async for e in UsageEvent.objects.filter(tenant=tenant)}
    assert sorted(events) == sorted(ids)
    assert events["req_7"].prompt_tokens == 7
    assert events["req_3"].prompt_tokens in (3, 999)  # whichever came first; never two rows
    assert events["req_0"].cost == Decimal("0.0000123400")
    assert events["req_0"].api_key_id is None
    assert events["req_0"].request_type == "chat"  # the model default for a field left out


@postgres_only
@pytest.mark.django_db(transaction=True)
async def test_a_row_written_alone_keeps_every_value_exactly(server_loop):
    """A row alone goes as one JSON object that PostgreSQL unpacks: money stays exact (no float on
    the way, an exponent as Decimal's str writes it), the timestamp keeps its microseconds, JSON
    columns keep their structure, None is NULL."""
    tenant = await sync_to_async(f.TenantFactory)()
    at = timezone.now().replace(microsecond=123456)
    attempts = [{"provider": "p", "latency_ms": 1.5, "error": "naïve \"quoted\" ✓", "nested": {"a": [1, None]}}]

    await usage_event_record(**row(tenant, "req_exact", timestamp=at, cost=Decimal("1234567890.1234567891"),
                                   saved_cost=Decimal("1E-10"), input_usd_per_mtok=Decimal("2.5"),
                                   output_usd_per_mtok=None, attempts=attempts, tags=["a", "b"],
                                   cached=True, model="ünï-cødé", end_user=""))

    event = await UsageEvent.objects.aget(request_id="req_exact")
    assert (event.cost, event.saved_cost, event.input_usd_per_mtok) == (
        Decimal("1234567890.1234567891"), Decimal("1E-10"), Decimal("2.5"))  # 20 digits: not via a float
    assert event.output_usd_per_mtok is None and event.api_key_id is None
    assert event.timestamp == at
    assert (event.attempts, event.tags, event.cached, event.model) == (attempts, ["a", "b"], True, "ünï-cødé")


@postgres_only
@pytest.mark.django_db(transaction=True)
async def test_a_bad_row_fails_only_its_own_request(server_loop):
    tenant = await sync_to_async(f.TenantFactory)()
    good = [usage_event_record(**row(tenant, f"req_ok_{i}")) for i in range(5)]
    bad = usage_event_record(**row(tenant, "req_bad", prompt_tokens=-1))  # refused by a CHECK constraint

    results = await asyncio.gather(*good, bad, return_exceptions=True)

    assert results[:5] == [None] * 5
    assert isinstance(results[5], Exception)
    assert await UsageEvent.objects.filter(tenant=tenant).acount() == 5


@pytest.mark.django_db(transaction=True)
async def test_outside_the_server_loop_the_orm_writes_the_row():
    tenant = await sync_to_async(f.TenantFactory)()

    await usage_event_record(**row(tenant, "req_orm"))
    await usage_event_record(**row(tenant, "req_orm", prompt_tokens=5))

    assert await db.pg_pool() is None
    event = await UsageEvent.objects.aget(request_id="req_orm")
    assert event.prompt_tokens == 0


@pytest.mark.skipif(not settings.REDIS_URL, reason="the stream lives in Redis")
@pytest.mark.django_db(transaction=True)
async def test_redis_stream_rows_reach_the_ledger_when_drained(settings):
    from apps.analytics.services import ledger_stream_drain

    settings.GATEWAY_LEDGER_WRITER = "redis-stream"
    tenant = await sync_to_async(f.TenantFactory)()
    for rid in ("req_s1", "req_s2", "req_s1"):
        await usage_event_record(**row(tenant, rid))
    assert await UsageEvent.objects.acount() == 0

    assert await sync_to_async(ledger_stream_drain)() == 3

    assert sorted([e.request_id async for e in UsageEvent.objects.all()]) == ["req_s1", "req_s2"]
    assert (await UsageEvent.objects.aget(request_id="req_s2")).cost == Decimal("0.0000123400")
    assert await sync_to_async(ledger_stream_drain)() == 0


@postgres_only
@pytest.mark.parametrize("mode", ["on", "off"])
async def test_the_ledger_connections_commit_as_configured(server_loop, settings, mode):
    settings.GATEWAY_LEDGER_SYNCHRONOUS_COMMIT = mode
    pool = await db.pg_pool()

    async with pool.connection() as conn:
        assert (await (await conn.execute("SHOW synchronous_commit")).fetchone())[0] == mode


@postgres_only
@pytest.mark.django_db(transaction=True)
async def test_the_writer_keeps_its_connection_between_rows_and_gives_it_back_when_idle(server_loop, monkeypatch):
    tenant = await sync_to_async(f.TenantFactory)()
    await usage_event_record(**row(tenant, "req_k1"))
    pool = await db.pg_pool()
    writer = services._batcher(pool)
    kept, requests = writer.conn, pool.get_stats().get("requests_num", 0)

    await usage_event_record(**row(tenant, "req_k2"))

    assert kept is not None and writer.conn is kept  # no checkout for the second row
    assert pool.get_stats().get("requests_num", 0) == requests
    monkeypatch.setattr(services, "LINGER_S", 0.0)
    writer.linger.cancel()
    writer._release_idle()  # the linger timer's turn, idle for LINGER_S now
    await asyncio.gather(*services._releasing)
    assert writer.conn is None
    assert pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"]
    assert await UsageEvent.objects.filter(tenant=tenant).acount() == 2


@postgres_only
@pytest.mark.django_db(transaction=True)
async def test_a_kept_connection_the_server_dropped_loses_no_row(server_loop, settings, tmp_path, monkeypatch):
    """PostgreSQL ends the writer's kept connection (a restart, an idle timeout): the next row is
    journaled, not lost, and replayed; the dead connection is not kept; the row after it is written."""
    settings.LEDGER_JOURNAL_DIR = str(tmp_path / "journal")
    settings.LEDGER_JOURNAL_SKIP_DB_S = 0
    settings.LEDGER_REPLAY_BACKOFF_S = 0.05
    monkeypatch.setattr(journal, "_replay_task", None)
    tenant = await sync_to_async(f.TenantFactory)()
    await usage_event_record(**row(tenant, "req_d1"))
    writer = services._batcher(await db.pg_pool())
    pid = writer.conn.info.backend_pid
    async with (await db.pg_pool()).connection() as other:
        await other.execute("SELECT pg_terminate_backend(%s)", (pid,))

    await usage_event_record(**row(tenant, "req_d2"))
    await usage_event_record(**row(tenant, "req_d3"))

    assert journal._replay_task is not None  # req_d2 went to the journal
    await asyncio.wait_for(journal._replay_task, 30)
    assert writer.conn.info.backend_pid != pid
    assert sorted([e.request_id async for e in UsageEvent.objects.filter(tenant=tenant)]) == [
        "req_d1", "req_d2", "req_d3"]
    assert journal.segments() == []


@pytest.mark.django_db(transaction=True)
def test_a_key_deleted_while_its_request_is_at_the_provider_keeps_the_requests_row(live_gateway, live_setup,
                                                                                  upstream):
    """The provider answered (and bills for it): the row is written whatever happened to the key
    meanwhile. Before, the ledger's foreign key to the key failed the insert at commit, the row was
    lost and the request answered 500."""
    import httpx

    from apps.keys.models import ApiKey

    key_id = live_setup.key.id
    upstream.before_answer = lambda body: ApiKey.objects.filter(id=key_id).delete()
    body = {"model": live_setup.alias, "messages": [{"role": "user", "content": "hi"}]}

    resp = httpx.post(f"{live_gateway}/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {live_setup.secret}"})

    assert resp.status_code == 200
    assert not ApiKey.objects.filter(id=key_id).exists()
    event = UsageEvent.objects.get(request_id=resp.headers["x-request-id"])
    assert (event.status, event.api_key_id, event.tenant_id) == (200, key_id, live_setup.tenant.id)
    assert event.cost > 0
