"""The partitioned ledger (PostgreSQL): monthly partitions, idempotency by request id across
months, partitions created ahead and taking over rows of the default partition, and the
conversion of an unpartitioned ledger without losing a row."""

import asyncio
import threading
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.db.models import Sum

from apps.analytics import partitions
from apps.analytics.models import UsageEvent, UsageEventRequest
from apps.analytics.services import (
    _adapted,
    _insert_sql,
    ledger_writes_drain,
    usage_event_record,
    usage_event_record_sync,
)
from apps.core import db
from tests import factories as f

pytestmark = pytest.mark.skipif(not settings.IS_POSTGRES, reason="partitioning is PostgreSQL's")

LAST_INSTANT = datetime(2026, 1, 31, 23, 59, 59, 900_000, tzinfo=UTC)
FIRST_INSTANT = datetime(2026, 2, 1, 0, 0, 0, 100_000, tzinfo=UTC)


def fields(tenant, request_id, at, **extra):
    return {"request_id": request_id, "timestamp": at, "tenant_id": tenant.id, "source_type": "application",
            "source_ref": "app", "model": "m", "status": 200, "cost": Decimal("0.0000100000"), **extra}


def partition_of(request_id: str) -> str:
    with connection.cursor() as cur:
        cur.execute("SELECT tableoid::regclass::text FROM analytics_usageevent WHERE request_id = %s", [request_id])
        return cur.fetchone()[0]


@pytest.fixture
def months():
    for m in (date(2026, 1, 1), date(2026, 2, 1)):
        partitions.partition_ensure(m)


@pytest.mark.django_db
def test_the_ledger_is_partitioned_with_partitions_ahead():
    assert partitions.is_partitioned()
    have = set(partitions.partitions())
    this_month = partitions.month_start(datetime.now(UTC))
    ahead = {partitions.month_add(this_month, i) for i in range(settings.LEDGER_PARTITIONS_AHEAD + 1)}
    assert ahead <= have


@pytest.mark.django_db
def test_rows_land_in_their_month(months):
    tenant = f.TenantFactory()
    usage_event_record_sync(**fields(tenant, "req_jan", LAST_INSTANT))
    usage_event_record_sync(**fields(tenant, "req_feb", FIRST_INSTANT))
    assert partition_of("req_jan") == "analytics_usageevent_p2026_01"
    assert partition_of("req_feb") == "analytics_usageevent_p2026_02"
    # the ORM reads across partitions as it did from one table
    assert list(UsageEvent.objects.filter(tenant=tenant).values_list("request_id", flat=True)) == ["req_feb",
                                                                                                      "req_jan"]


@pytest.mark.django_db
def test_columns_added_by_migration_reach_every_partition_with_their_defaults(months):
    """analytics/0007 added `tags` and `end_user` (and an index) to the partitioned parent: every
    partition, old and new, has them, and a writer that leaves them out (the previous release during
    a rolling deploy) gets the defaults."""
    partitions.partition_ensure(date(2026, 3, 1))  # made after the migration
    tenant = f.TenantFactory()
    with connection.cursor() as cur:
        cur.execute("INSERT INTO analytics_usageevent (request_id, timestamp, tenant_id, source_type, source_ref, "
                    "request_type, model, provider, upstream_model, prompt_tokens, completion_tokens, cached_tokens, "
                    "cache_write_tokens, reasoning_tokens, cost, saved_cost, status, error_code, latency_ms, cached, "
                    "stream, is_async, batch_id, budget_id, priority, estimated) VALUES (%s, %s, %s, 'application', "
                    "'app', 'chat', 'm', '', '', 0, 0, 0, 0, 0, 0, 0, 200, '', 0, false, false, false, '', '', 0, "
                    "false)", ["req_old_writer", LAST_INSTANT, tenant.id])
    usage_event_record_sync(**fields(tenant, "req_tagged", FIRST_INSTANT, tags=["a", "b"], end_user="alice"))

    old, tagged = UsageEvent.objects.get(request_id="req_old_writer"), UsageEvent.objects.get(request_id="req_tagged")
    assert (old.tags, old.end_user) == ([], "")
    assert (tagged.tags, tagged.end_user) == (["a", "b"], "alice")
    assert list(UsageEvent.objects.filter(tags__has_tag="b").values_list("request_id", flat=True)) == ["req_tagged"]
    with connection.cursor() as cur:
        for month in ("2026_01", "2026_02", "2026_03"):
            cur.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = %s "
                        "AND column_name IN ('tags', 'end_user')", [f"analytics_usageevent_p{month}"])
            assert cur.fetchone()[0] == 2
            cur.execute("SELECT count(*) FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%end_user%%'",
                        [f"analytics_usageevent_p{month}"])
            assert cur.fetchone()[0] == 1


@pytest.mark.django_db
@pytest.mark.parametrize(("first", "second"), [(LAST_INSTANT, FIRST_INSTANT), (FIRST_INSTANT, LAST_INSTANT)])
def test_a_request_written_on_both_sides_of_midnight_is_one_row(months, first, second):
    """Starts 23:59:59.9 on the last day of January, written again (retry, journal replay) with a
    February timestamp, or the other way round: one row, the first one."""
    tenant = f.TenantFactory()
    usage_event_record_sync(**fields(tenant, "req_midnight", first, prompt_tokens=1))
    usage_event_record_sync(**fields(tenant, "req_midnight", second, prompt_tokens=2))
    rows = list(UsageEvent.objects.filter(request_id="req_midnight").values_list("timestamp", "prompt_tokens"))
    assert rows == [(first, 1)]
    assert UsageEventRequest.objects.get(request_id="req_midnight").timestamp == first


@pytest.mark.django_db
def test_the_group_commit_statement_is_idempotent_across_months_within_and_between_batches(months):
    """The gateway's one-statement batch insert: duplicates inside one batch and against earlier
    rows, on both sides of a month boundary, give one row per request id."""
    tenant = f.TenantFactory()
    sql, columns = _insert_sql()

    def batch(rows):
        rows = [_adapted([r[a] if a in r else default() for a, default in columns]) for r in rows]
        arrays = [list(column) for column in zip(*rows, strict=True)]
        with connection.cursor() as cur:
            cur.execute(sql, arrays)

    batch([fields(tenant, "req_a", LAST_INSTANT), fields(tenant, "req_a", FIRST_INSTANT),
           fields(tenant, "req_b", FIRST_INSTANT)])
    batch([fields(tenant, "req_b", LAST_INSTANT), fields(tenant, "req_c", LAST_INSTANT)])
    assert sorted(UsageEvent.objects.values_list("request_id", flat=True)) == ["req_a", "req_b", "req_c"]
    assert partition_of("req_a") == "analytics_usageevent_p2026_01"
    assert partition_of("req_b") == "analytics_usageevent_p2026_02"


def _dsn() -> str:
    s = connection.settings_dict
    return psycopg.conninfo.make_conninfo(dbname=s["NAME"], user=s["USER"] or None, host=s["HOST"] or None,
                                          port=str(s["PORT"] or "") or None, password=s["PASSWORD"] or None)


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_of_one_request_in_two_months_leave_one_row(months):
    """Two transactions insert the same request id, one in January, one in February: the second
    waits on the first's idempotency key and then skips; no duplicate across partitions."""
    tenant = f.TenantFactory()
    sql, columns = _insert_sql()

    def args(at):
        r = fields(tenant, "req_race", at)
        return [[v] for v in _adapted([r[a] if a in r else default() for a, default in columns])]

    first = psycopg.connect(_dsn())
    second = psycopg.connect(_dsn())
    try:
        first.execute(sql, args(LAST_INSTANT))  # in flight, not committed
        done = threading.Event()

        def other():
            second.execute(sql, args(FIRST_INSTANT))
            second.commit()
            done.set()

        t = threading.Thread(target=other)
        t.start()
        assert not done.wait(0.3)  # blocked on the first transaction's key
        first.commit()
        t.join(10)
        assert done.is_set()
    finally:
        first.close()
        second.close()
    assert list(UsageEvent.objects.filter(request_id="req_race").values_list("timestamp", flat=True)) == [
        LAST_INSTANT]


@pytest.mark.django_db(transaction=True)
async def test_the_async_group_commit_writes_across_months_once(months, server_loop):
    tenant = await sync_to_async(f.TenantFactory)()
    await asyncio.gather(*(usage_event_record(**fields(tenant, f"req_{i % 5}", at))
                           for i, at in enumerate([LAST_INSTANT, FIRST_INSTANT] * 10)))
    await ledger_writes_drain()  # rows journaled first (the default writer) are committed after the call
    assert await db.pg_pool() is not None
    ids = [r async for r in UsageEvent.objects.values_list("request_id", flat=True)]
    assert sorted(ids) == [f"req_{i}" for i in range(5)]


@pytest.mark.django_db
def test_a_new_partition_takes_over_its_rows_from_the_default_partition():
    tenant = f.TenantFactory()
    far = datetime(2031, 7, 15, 12, tzinfo=UTC)
    month = date(2031, 7, 1)
    assert month not in partitions.partitions()
    usage_event_record_sync(**fields(tenant, "req_far", far, cost=Decimal("1.5")))
    assert partition_of("req_far") == partitions.DEFAULT_PARTITION

    assert partitions.partition_ensure(month) is True
    assert partitions.partition_ensure(month) is False

    assert partition_of("req_far") == "analytics_usageevent_p2031_07"
    assert UsageEvent.objects.get(request_id="req_far").cost == Decimal("1.5")
    usage_event_record_sync(**fields(tenant, "req_far", far + timedelta(days=30)))  # still idempotent
    assert UsageEvent.objects.filter(request_id="req_far").count() == 1
    # the attached partition got the parent's indexes and trigger
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'analytics_usageevent_p2031_07'")
        assert cur.fetchone()[0] >= 10


def _totals():
    agg = UsageEvent.objects.aggregate(cost=Sum("cost"), prompt=Sum("prompt_tokens"), saved=Sum("saved_cost"))
    return UsageEvent.objects.count(), agg, sorted(UsageEvent.objects.values_list("id", "request_id"))


@pytest.mark.django_db(transaction=True)
def test_migration_from_the_unpartitioned_ledger_keeps_every_row():
    from django.db.migrations.executor import MigrationExecutor

    def migrate(target):
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(target)

    latest = MigrationExecutor(connection).loader.graph.leaf_nodes("analytics")
    migrate([("analytics", "0002_usage_rollups")])
    try:
        assert not partitions.is_partitioned()
        tenants = [f.TenantFactory(), f.TenantFactory()]
        start = datetime(2025, 11, 20, tzinfo=UTC)
        with connection.cursor() as cur:  # the old table, as the old code wrote it
            for i in range(300):
                cur.execute(
                    "INSERT INTO analytics_usageevent (request_id, timestamp, tenant_id, source_type, source_ref, "
                    "request_type, model, provider, upstream_model, prompt_tokens, completion_tokens, cached_tokens, "
                    "cache_write_tokens, reasoning_tokens, cost, saved_cost, status, error_code, latency_ms, cached, "
                    "stream, is_async, batch_id, budget_id, priority, estimated) VALUES (%s, %s, %s, 'application', "
                    "'app', 'chat', 'm', '', '', %s, 1, 0, 0, 0, %s, %s, 200, '', 5, false, false, false, '', '', "
                    "0, false)",
                    [f"req_old{i}", start + timedelta(hours=7 * i), tenants[i % 2].id, i,
                     Decimal(i) / Decimal(7), Decimal("0.0000000001") * i])
        before = _totals()
        assert before[0] == 300

        migrate(latest)

        assert partitions.is_partitioned()
        assert _totals() == before
        assert {date(2025, 11, 1), date(2025, 12, 1), date(2026, 1, 1)} <= set(partitions.partitions())
        assert UsageEventRequest.objects.count() == 300
        usage_event_record_sync(**fields(tenants[0], "req_old5", datetime(2026, 2, 1, tzinfo=UTC)))
        assert UsageEvent.objects.count() == 300  # its id was kept as the idempotency key
        usage_event_record_sync(**fields(tenants[0], "req_new", datetime(2025, 12, 3, tzinfo=UTC)))
        assert UsageEvent.objects.get(request_id="req_new").id > max(i for i, _ in before[2])
    finally:
        migrate(latest)
