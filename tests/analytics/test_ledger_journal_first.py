"""The default ledger write on the ASGI server's loop (GATEWAY_LEDGER_WRITER=journal): a row is
written to the local journal before its call returns (and fsync'ed, with LEDGER_JOURNAL_FIRST_FSYNC),
then committed to the ledger after, and its journal segment is deleted once every row in it is in
the ledger. A row that does not get there stays in the journal, fsync'ed, for the replay. (A
gateway killed between the two: tests/analytics/test_ledger_outage.py.)"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from apps.analytics import journal, services
from apps.analytics.journal import ledger_replay
from apps.analytics.models import UsageEvent
from apps.analytics.services import usage_event_record
from apps.core import db
from tests import factories as f

pytestmark = [pytest.mark.skipif(not settings.IS_POSTGRES, reason="the async pool is PostgreSQL's"),
              pytest.mark.django_db(transaction=True)]


def row(tenant, request_id, **extra):
    return {"request_id": request_id, "timestamp": timezone.now(), "tenant_id": tenant.id, "api_key_id": None,
            "source_id": None, "source_type": "application", "source_ref": "app", "model": "m", "status": 200,
            "cost": Decimal("0.0000123400"), "prompt_tokens": 7, **extra}


@pytest.fixture(autouse=True)
def journal_first(settings, tmp_path, monkeypatch, server_loop):
    settings.GATEWAY_LEDGER_WRITER = "journal"
    settings.LEDGER_JOURNAL_DIR = str(tmp_path / "journal")
    settings.LEDGER_PENDING_SEGMENT_S = 0.05
    settings.LEDGER_REPLAY_BACKOFF_S = 0.05
    monkeypatch.setattr(journal, "_pending_writer", None)
    monkeypatch.setattr(journal, "_replay_task", None)
    monkeypatch.setattr(services, "_batchers", {})
    journal.db_up()
    yield tmp_path / "journal"
    journal.db_up()


@pytest.fixture
def ledger_blocked(monkeypatch):
    """The ledger's inserts wait for `gate` (the database is slow, or the process is about to die)."""
    gate = asyncio.Event()
    real_insert = services._Batcher._insert

    async def gated(self, rows):
        await gate.wait()
        await real_insert(self, rows)

    monkeypatch.setattr(services._Batcher, "_insert", gated)
    return gate


def journaled(directory: Path) -> list[str]:
    return [orjson.loads(line)["request_id"] for seg in journal.segments(directory)
            for line in seg.read_bytes().splitlines()]


async def ledger_ids(tenant) -> list[str]:
    return sorted([e.request_id async for e in UsageEvent.objects.filter(tenant=tenant)])


async def test_the_row_is_on_disk_when_the_call_returns_and_in_the_ledger_after(journal_first, ledger_blocked):
    tenant = await sync_to_async(f.TenantFactory)()

    in_ledger = await usage_event_record(**row(tenant, "req_j1", cost=Decimal("1234567890.1234567891")))

    assert journaled(journal_first) == ["req_j1"]  # durable before the call returned
    assert await ledger_ids(tenant) == [] and not in_ledger.done()
    # While its writer lives, a replay leaves the segment alone (the writer holds its lock).
    assert (await asyncio.to_thread(ledger_replay))["segments"] == 0
    assert await ledger_ids(tenant) == []

    ledger_blocked.set()
    await in_ledger

    assert await ledger_ids(tenant) == ["req_j1"]
    assert (await UsageEvent.objects.aget(request_id="req_j1")).cost == Decimal("1234567890.1234567891")
    await journal.pending_close()
    assert journal.segments(journal_first) == []  # every row in the ledger: the segment is gone


@pytest.fixture
def fsyncs(monkeypatch):
    """The journal's fdatasync calls, counted."""
    calls = []
    real = os.fdatasync

    def counted(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(journal.os, "fdatasync", counted)
    return calls


@pytest.mark.parametrize("fsync", [False, True], ids=["written", "fsynced"])
async def test_concurrent_rows_are_journaled_together_and_each_reaches_the_ledger_once(
        journal_first, monkeypatch, settings, fsyncs, fsync):
    """Rows that come while an append is in the journal's thread go together in the next one (one
    fsync for all with LEDGER_JOURNAL_FIRST_FSYNC; none without: the rows reached the ledger)."""
    settings.LEDGER_JOURNAL_FIRST_FSYNC = fsync
    tenant = await sync_to_async(f.TenantFactory)()
    writes = []
    real_write = journal._Pending.write

    def counted(self, data, **kw):
        writes.append(data.count(b"\n"))
        real_write(self, data, **kw)

    monkeypatch.setattr(journal._Pending, "write", counted)
    ids = [f"req_c{i}" for i in range(40)]

    at = timezone.now().replace(microsecond=123456)
    exact = {"cost": Decimal("1234567890.1234567891"), "saved_cost": Decimal("1E-10"), "timestamp": at,
             "attempts": [{"error": "naïve \"quoted\" ✓", "nested": {"a": [1, None]}}], "tags": ["a", "b"],
             "output_usd_per_mtok": None}

    futures = await asyncio.gather(*(usage_event_record(**row(tenant, rid, **(exact if rid == "req_c7" else {})))
                                     for rid in ids),
                                   usage_event_record(**row(tenant, "req_c3", prompt_tokens=999)))
    await asyncio.gather(*futures)

    assert sum(writes) == 41 and len(writes) < 41  # rows that came together went in one append
    assert len(fsyncs) == (len(writes) if fsync else 0)
    assert await ledger_ids(tenant) == sorted(ids)  # req_c3 once
    # Committed together (one JSON array): every value exactly as given.
    event = await UsageEvent.objects.aget(request_id="req_c7")
    assert {k: getattr(event, k) for k in exact} == exact
    await journal.pending_close()
    assert journal.segments(journal_first) == []


async def test_an_idle_segment_is_deleted_once_its_rows_are_in_the_ledger(journal_first):
    tenant = await sync_to_async(f.TenantFactory)()
    await (await usage_event_record(**row(tenant, "req_i1")))
    assert len(journal.segments(journal_first)) == 1  # still open: the next row may come at once

    writer = journal.pending_writer()
    while writer.current is not None or writer.finishing:  # the idle timer's turn (LEDGER_PENDING_SEGMENT_S)
        await asyncio.sleep(0.01)

    assert journal.segments(journal_first) == []
    assert await ledger_ids(tenant) == ["req_i1"]


async def test_a_cancelled_requests_row_still_reaches_the_ledger(journal_first, ledger_blocked):
    tenant = await sync_to_async(f.TenantFactory)()
    call = asyncio.ensure_future(usage_event_record(**row(tenant, "req_x1")))
    for _ in range(3):  # loop turns: the row is on its way to the journal
        await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    ledger_blocked.set()
    await services.ledger_writers_release()  # what the server's shutdown does

    assert await ledger_ids(tenant) == ["req_x1"]
    assert journal.segments(journal_first) == []


async def test_once_its_segment_is_open_a_row_is_written_on_the_loop_and_never_fsynced_if_it_reaches_the_ledger(
        journal_first, ledger_blocked, settings, fsyncs, monkeypatch):
    settings.LEDGER_PENDING_SEGMENT_S = 60  # one segment for both rows
    tenant = await sync_to_async(f.TenantFactory)()
    first = await usage_event_record(**row(tenant, "req_w1"))  # the segment is opened in the journal's thread
    submitted = []
    real_submit = journal._executor.submit

    def submit(fn, *args, **kwargs):
        submitted.append(fn)
        return real_submit(fn, *args, **kwargs)

    monkeypatch.setattr(journal._executor, "submit", submit)
    second = await usage_event_record(**row(tenant, "req_w2"))

    assert journaled(journal_first) == ["req_w1", "req_w2"]  # in the journal when the call returned
    assert submitted == [] and fsyncs == []  # one write() on the loop
    ledger_blocked.set()
    await asyncio.gather(first, second)
    assert await ledger_ids(tenant) == ["req_w1", "req_w2"]
    await journal.pending_close()
    assert journal.segments(journal_first) == [] and fsyncs == []


async def test_rows_the_database_cannot_take_stay_in_the_journal_fsynced_and_are_replayed(
        journal_first, settings, monkeypatch, fsyncs):
    """The async pool cannot reach the database (the ORM that the replay uses can): every call
    returns with its row in the journal, which is fsync'ed then (the rows must outlive the
    machine too), and the background replay puts the rows in the ledger."""
    settings.GATEWAY_PG_POOL_TIMEOUT_S = 0.5
    settings.LEDGER_PENDING_SEGMENT_S = 60
    monkeypatch.setattr(db, "_conninfo", lambda: "host=127.0.0.1 port=1 dbname=nothing connect_timeout=1")
    tenant = await sync_to_async(f.TenantFactory)()
    ids = [f"req_d{i}" for i in range(10)]

    futures = await asyncio.gather(*(usage_event_record(**row(tenant, rid)) for rid in ids))
    await asyncio.gather(*futures)  # done: left to the replay
    assert journal.db_skipped()
    assert sorted(journaled(journal_first)) == ids
    async def fsynced():
        while not fsyncs:  # the journal's thread's turn
            await asyncio.sleep(0.01)

    await asyncio.wait_for(fsynced(), 10)  # at once: the segment is still open
    await journal.pending_close()  # closed, then handed to the replay
    while journal._replay_task is None:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(journal._replay_task, 30)

    assert await ledger_ids(tenant) == ids
    assert journal.segments(journal_first) == []


async def test_a_row_the_database_refuses_after_its_answer_is_set_aside_for_an_operator(journal_first):
    tenant = await sync_to_async(f.TenantFactory)()

    done = [await usage_event_record(**row(tenant, "req_ok")),
            await usage_event_record(**row(tenant, "req_bad", prompt_tokens=-1))]  # a CHECK constraint refuses it
    await asyncio.gather(*done)
    while journal._replay_task is None:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(journal._replay_task, 30)

    assert await ledger_ids(tenant) == ["req_ok"]
    rejected = [orjson.loads(line)["request_id"] for p in (journal_first / journal.REJECTED_DIR).glob("*")
                for line in p.read_bytes().splitlines()]
    assert rejected == ["req_bad"]  # not lost: kept for an operator
    assert journal.segments(journal_first) == []


async def test_when_the_journal_cannot_be_written_the_row_is_committed_before_the_call_returns(
        journal_first, monkeypatch):
    tenant = await sync_to_async(f.TenantFactory)()

    def disk_full(self, data, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal._Pending, "write", disk_full)

    in_ledger = await usage_event_record(**row(tenant, "req_full"))

    assert await ledger_ids(tenant) == ["req_full"]
    await in_ledger
