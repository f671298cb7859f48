"""The ledger journal: a row the database cannot take is appended durably to local disk and
replayed into the ledger idempotently; a segment goes only after its rows are committed."""

import asyncio
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.management import call_command
from django.db import OperationalError
from django.utils import timezone

from apps.analytics import journal, metrics, services
from apps.analytics.models import UsageEvent, UsageRollupHourly
from apps.analytics.services import usage_event_record
from apps.core import db
from tests import factories as f

postgres_only = pytest.mark.skipif(not settings.IS_POSTGRES, reason="the async pool is PostgreSQL's")


def row(tenant, request_id, **extra):
    return {"request_id": request_id, "timestamp": timezone.now(), "tenant_id": tenant.id, "api_key_id": None,
            "source_id": None, "source_type": "application", "source_ref": "app", "model": "m", "status": 200,
            "cost": Decimal("0.0000123400"), "prompt_tokens": 7, **extra}


@pytest.fixture(autouse=True)
def journal_dir(settings, tmp_path, monkeypatch):
    settings.LEDGER_JOURNAL_DIR = str(tmp_path / "journal")
    monkeypatch.setattr(journal, "_writer", journal._SegmentWriter())
    monkeypatch.setattr(journal, "_group", None)
    journal.db_up()
    yield tmp_path / "journal"
    journal.db_up()
    if journal._writer.fd is not None:
        journal._writer._rotate()


def journaled(directory: Path) -> list[dict]:
    return [orjson.loads(line) for seg in journal.segments(directory) for line in seg.read_bytes().splitlines()]


def test_a_journaled_row_replayed_twice_gives_one_row(db, journal_dir):
    tenant = f.TenantFactory()
    r = row(tenant, "req_j1")
    journal.journal_append([r])
    journal._writer._rotate()  # another process's segment, say
    journal.journal_append([r, row(tenant, "req_j2")])

    assert len(journal.segments()) == 2
    result = journal.ledger_replay()

    assert result == {"segments": 2, "rows": 3, "rejected": 0, "left": 0}
    assert journal.segments() == []
    event = UsageEvent.objects.get(request_id="req_j1")
    assert event.cost == Decimal("0.0000123400")  # exact: Decimal through its string
    assert event.timestamp == r["timestamp"]
    assert sorted(UsageEvent.objects.values_list("request_id", flat=True)) == ["req_j1", "req_j2"]

    journal.journal_append([r])  # journaled again after it was replayed
    journal.ledger_replay()
    assert UsageEvent.objects.filter(request_id="req_j1").count() == 1


def test_a_segment_stays_until_its_rows_are_committed(db, journal_dir, monkeypatch):
    tenant = f.TenantFactory()
    journal.journal_append([row(tenant, "req_k1")])

    def database_down(*a, **k):
        raise OperationalError("connection refused")

    with monkeypatch.context() as m:
        m.setattr(UsageEvent.objects, "insert_new", database_down)
        with pytest.raises(OperationalError):
            journal.ledger_replay()

    assert len(journal.segments()) == 1
    assert not UsageEvent.objects.filter(request_id="req_k1").exists()
    assert journal.ledger_replay()["rows"] == 1
    assert journal.segments() == []
    assert UsageEvent.objects.filter(request_id="req_k1").count() == 1


def test_a_crash_between_insert_and_delete_inserts_nothing_twice(db, journal_dir, monkeypatch):
    tenant = f.TenantFactory()
    journal.journal_append([row(tenant, "req_c1"), row(tenant, "req_c2")])

    def crash(self, *a, **k):
        raise SystemExit("killed")

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", crash)
        with pytest.raises(SystemExit):
            journal.ledger_replay()

    assert len(journal.segments()) == 1  # the rows are in, the segment too
    assert UsageEvent.objects.filter(tenant=tenant).count() == 2
    assert journal.ledger_replay()["segments"] == 1
    assert journal.segments() == []
    assert UsageEvent.objects.filter(tenant=tenant).count() == 2


def test_a_segment_held_by_another_replayer_is_left_to_it(db, journal_dir):
    tenant = f.TenantFactory()
    journal.journal_append([row(tenant, "req_l1")])
    held = journal._claim(journal.segments()[0])
    try:
        assert journal.ledger_replay() == {"segments": 0, "rows": 0, "rejected": 0, "left": 1}
        # and the writer, finding its segment held, appends to a new one
        journal.journal_append([row(tenant, "req_l2")])
        assert len(journal.segments()) == 2
    finally:
        held.close()
    assert journal.ledger_replay()["rows"] == 2
    assert UsageEvent.objects.filter(tenant=tenant).count() == 2


def test_the_writer_starts_a_new_segment_when_its_own_was_replayed(db, journal_dir):
    tenant = f.TenantFactory()
    journal.journal_append([row(tenant, "req_n1")])
    journal.ledger_replay()  # deletes the writer's open segment
    journal.journal_append([row(tenant, "req_n2")])

    assert [r["request_id"] for r in journaled(journal_dir)] == ["req_n2"]
    journal.ledger_replay()
    assert UsageEvent.objects.filter(tenant=tenant).count() == 2


def test_a_row_the_database_refuses_is_set_aside_and_the_others_go_in(db, journal_dir):
    tenant = f.TenantFactory()
    journal.journal_append([row(tenant, "req_ok"), row(tenant, "req_bad", prompt_tokens=-1)])
    with open(journal.segments()[0], "ab") as seg:
        seg.write(b'{"request_id": "req_torn", "tenan')  # an append torn by a crash: never acknowledged

    result = journal.ledger_replay()

    assert result["rows"] == 1 and result["rejected"] == 1
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == ["req_ok"]
    kept = list((journal_dir / journal.REJECTED_DIR).glob("*.jsonl"))
    assert [orjson.loads(line)["request_id"] for line in kept[0].read_bytes().splitlines()] == ["req_bad"]
    assert journal.segments() == []


def test_a_row_whose_tenant_is_gone_is_set_aside_and_its_hours_rollups_still_recompute(db, journal_dir):
    """The tenant was deleted while its only row was in a journal: the ledger (no foreign-key
    constraints) would take the row, and its hour's rollup recompute would then fail for everyone."""
    tenant, gone = f.TenantFactory(), f.TenantFactory()
    at = timezone.now()
    journal.journal_append([row(tenant, "req_kept", timestamp=at), row(gone, "req_orphan", timestamp=at)])
    gone.delete()

    result = journal.ledger_replay()

    assert result["rows"] == 1 and result["rejected"] == 1
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == ["req_kept"]
    hour = at.replace(minute=0, second=0, microsecond=0)
    assert UsageRollupHourly.objects.get(tenant=tenant, bucket=hour).requests == 1
    kept = list((journal_dir / journal.REJECTED_DIR).glob("*.jsonl"))
    assert [orjson.loads(line)["request_id"] for line in kept[0].read_bytes().splitlines()] == ["req_orphan"]
    assert journal.segments() == []


def test_beat_replays_the_journal(db, journal_dir):
    from apps.analytics.tasks import ledger_replay_task

    assert settings.CELERY_BEAT_SCHEDULE["analytics-ledger-replay"]["task"] == ledger_replay_task.name
    tenant = f.TenantFactory()
    journal.journal_append([row(tenant, "req_beat")])

    assert ledger_replay_task.apply().get()["rows"] == 1
    assert UsageEvent.objects.filter(request_id="req_beat").count() == 1
    assert journal.segments() == []


def test_replayed_rows_reach_the_rollups_whatever_their_age(db, journal_dir):
    tenant = f.TenantFactory()
    old = timezone.now() - timedelta(hours=settings.ANALYTICS_ROLLUP_LOOKBACK_H + 5)
    journal.journal_append([row(tenant, "req_old", timestamp=old)])

    journal.ledger_replay()

    hour = old.replace(minute=0, second=0, microsecond=0)
    rollup = UsageRollupHourly.objects.get(tenant=tenant, bucket=hour)
    assert rollup.requests == 1 and rollup.prompt_tokens == 7 and rollup.cost == Decimal("0.0000123400")


@pytest.mark.django_db(transaction=True)
async def test_a_row_the_database_cannot_take_is_journaled_and_the_call_returns(journal_dir, monkeypatch):
    tenant = await sync_to_async(f.TenantFactory)()
    before = metrics.LEDGER_JOURNALED._value.get()

    def database_down(**fields):
        raise OperationalError("the database system is shutting down")

    monkeypatch.setattr(services, "usage_event_record_sync", database_down)
    await usage_event_record(**row(tenant, "req_d1"))
    assert journal.db_skipped()  # the next rows do not wait on it
    await usage_event_record(**row(tenant, "req_d2"))

    assert [r["request_id"] for r in journaled(journal_dir)] == ["req_d1", "req_d2"]
    assert metrics.LEDGER_JOURNALED._value.get() == before + 2
    monkeypatch.undo()
    await sync_to_async(call_command)("ledger_replay")
    assert sorted([e.request_id async for e in UsageEvent.objects.filter(tenant=tenant)]) == ["req_d1", "req_d2"]
    assert journal.segments() == []


@pytest.mark.django_db(transaction=True)
async def test_when_the_journal_fails_too_the_call_raises(journal_dir, monkeypatch):
    tenant = await sync_to_async(f.TenantFactory)()

    def database_down(**fields):
        raise OperationalError("connection refused")

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(services, "usage_event_record_sync", database_down)
    monkeypatch.setattr(journal._SegmentWriter, "append", disk_full)
    with pytest.raises(OSError, match="No space left"):
        await usage_event_record(**row(tenant, "req_f1"))


@postgres_only
@pytest.mark.django_db(transaction=True)
async def test_the_group_commit_journals_a_batch_when_the_pool_cannot_connect(journal_dir, monkeypatch,
                                                                             settings):
    """The server loop's async pool pointed at a port nobody listens on: concurrent rows are
    journaled, each call returns, and the background replay puts them in the ledger (the ORM
    reaches the real database)."""
    settings.GATEWAY_LEDGER_WRITER = "batch"
    settings.GATEWAY_PG_POOL_TIMEOUT_S = 0.5
    settings.LEDGER_REPLAY_BACKOFF_S = 0.05
    for name in ("_server_loop", "_pool", "_pool_loop"):
        monkeypatch.setattr(db, name, None)
    monkeypatch.setattr(db, "_conninfo", lambda: "host=127.0.0.1 port=1 dbname=nothing connect_timeout=1")
    monkeypatch.setattr(journal, "_replay_task", None)
    monkeypatch.setattr(services, "_batchers", {})
    db.server_loop_mark()
    tenant = await sync_to_async(f.TenantFactory)()
    ids = [f"req_b{i}" for i in range(20)]
    try:
        await asyncio.gather(*(usage_event_record(**row(tenant, rid)) for rid in ids))
        assert journal._replay_task is not None
        await asyncio.wait_for(journal._replay_task, 30)
    finally:
        if journal._replay_task is not None:
            journal._replay_task.cancel()
        await db._pool.close()

    assert sorted([e.request_id async for e in UsageEvent.objects.filter(tenant=tenant)]) == sorted(ids)
    assert journal.segments() == []


def test_start_up_replays_the_journal_in_a_thread(transactional_db, journal_dir):
    assert journal.replay_in_background("test") is None  # nothing journaled: no thread
    tenant = f.TenantFactory()
    journal.journal_append([row(tenant, "req_boot")])

    thread = journal.replay_in_background("test")
    thread.join(30)

    assert not thread.is_alive()
    assert UsageEvent.objects.filter(request_id="req_boot").count() == 1
    assert journal.segments() == []
