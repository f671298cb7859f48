"""Retention and archive of the ledger: a month archived as compressed CSV with a manifest and
checksums (local directory, or S3 through a local moto server), dropped, and restored with identical
rows and totals; per-tenant retention; rollups kept; the dashboard lists archived months."""

import csv
import gzip
import hashlib
import io
import json
import socket
import urllib.request
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db.models import Sum

from apps.analytics import archive, partitions
from apps.analytics.models import LedgerArchive, LedgerRetention, UsageEvent, UsageRollupDaily
from apps.analytics.services import usage_rollup_recompute
from tests import factories as f

JAN, FEB, MAR = date(2026, 1, 1), date(2026, 2, 1), date(2026, 3, 1)
COLUMNS = [fld.attname for fld in UsageEvent._meta.concrete_fields]


@pytest.fixture
def store(tmp_path, settings):
    settings.LEDGER_ARCHIVE_URL = str(tmp_path / "archive")
    return archive.archive_store()


def make_rows(tenant, month: date, n: int, start=0):
    at = datetime(month.year, month.month, 1, tzinfo=UTC)
    key = f.ApiKeyFactory(tenant=tenant)
    for i in range(start, start + n):
        f.UsageEventFactory(
            tenant=tenant, request_id=f"req_{tenant.slug}_{month:%Y%m}_{i}", api_key=key if i % 2 else None,
            timestamp=at + timedelta(hours=13 * i, microseconds=i), prompt_tokens=10 + i, completion_tokens=i,
            cost=Decimal("0.0000123457") * (i + 1), saved_cost=Decimal("0.5") if i % 3 == 0 else Decimal(0),
            input_usd_per_mtok=Decimal("0.15") if i % 2 else None, cached=i % 4 == 0, batch_id=f"b{i % 2}",
            source_ref='has, "quotes"\nand a newline', status=200 if i % 5 else 502)


def snapshot(tenant_ids=None):
    qs = UsageEvent.objects.order_by("id")
    if tenant_ids:
        qs = qs.filter(tenant_id__in=tenant_ids)
    return list(qs.values_list(*COLUMNS))


def totals():
    return UsageEvent.objects.aggregate(n=Sum("prompt_tokens"), c=Sum("cost"), s=Sum("saved_cost")), \
        UsageEvent.objects.count()


@pytest.fixture
def ledger(db):
    for m in (JAN, FEB, MAR):
        if partitions.is_partitioned():
            partitions.partition_ensure(m)
    acme, globex = f.TenantFactory(slug="acme"), f.TenantFactory(slug="globex")
    make_rows(acme, JAN, 30)
    make_rows(globex, JAN, 12)
    make_rows(acme, FEB, 5)
    usage_rollup_recompute(since=datetime(2026, 1, 1, tzinfo=UTC), until=datetime(2026, 3, 1, tzinfo=UTC))
    return acme, globex


def rollups():
    return sorted(UsageRollupDaily.objects.values_list("tenant_id", "bucket", "model", "status_class", "requests",
                                                       "cost"))


def test_a_month_is_archived_dropped_and_restored_with_identical_rows(ledger, store, tmp_path):
    acme, globex = ledger
    before_all, before_jan = snapshot(), snapshot([acme.id, globex.id])
    jan_rows = [r for r in before_jan if r[COLUMNS.index("timestamp")] < datetime(2026, 2, 1, tzinfo=UTC)]
    before_totals, before_rollups = totals(), rollups()

    result = archive.ledger_archive_and_drop(month=JAN)

    assert result["tenants"] == sorted([acme.id, globex.id])
    assert result["partition_dropped"] is partitions.is_partitioned()
    if partitions.is_partitioned():
        assert JAN not in partitions.partitions()
    assert UsageEvent.objects.count() == 5  # February's stay
    manifest = json.loads((tmp_path / "archive" / "2026-01" / "manifest.json").read_text())
    entry = manifest["tenants"][str(acme.id)]
    data = (tmp_path / "archive" / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"] == LedgerArchive.objects.get(tenant=acme).sha256
    assert entry["rows"] == 30 and manifest["columns"] == COLUMNS
    assert gzip.decompress(data).decode().splitlines()[0].split(",") == COLUMNS
    assert all(a.dropped_at for a in LedgerArchive.objects.all())
    # rollups are kept, even when recomputed over the dropped month
    usage_rollup_recompute(since=datetime(2025, 12, 31, tzinfo=UTC), until=datetime(2026, 2, 2, tzinfo=UTC))
    assert rollups() == before_rollups

    restored = archive.ledger_restore_month(month=JAN)

    assert restored["tenants"][acme.id]["rows"] == 30
    assert snapshot() == before_all  # every column of every row, ids included
    assert totals() == before_totals
    assert [r for r in snapshot([acme.id, globex.id]) if r in jan_rows] == jan_rows
    assert not LedgerArchive.objects.filter(dropped_at__isnull=False).exists()
    # restoring twice adds nothing; new rows get new ids
    archive.ledger_restore_month(month=JAN)
    assert UsageEvent.objects.count() == 47
    f.UsageEventFactory(tenant=acme, timestamp=datetime(2026, 1, 5, tzinfo=UTC))
    assert UsageEvent.objects.count() == 48


def test_a_tenant_past_its_retention_goes_alone(ledger, store, settings):
    acme, globex = ledger
    settings.LEDGER_RETENTION_MONTHS = 0  # globex: forever
    LedgerRetention.objects.create(tenant=acme, months=2)
    globex_rows = snapshot([globex.id])

    # May: acme keeps March and April (and May); January and February go
    done = archive.ledger_upkeep(now=datetime(2026, 5, 10, tzinfo=UTC))

    assert [d["month"] for d in done["dropped"]] == ["2026-01", "2026-02"]
    assert not UsageEvent.objects.filter(tenant=acme).exists()
    assert snapshot([globex.id]) == globex_rows
    if partitions.is_partitioned():
        assert JAN in partitions.partitions()  # globex still has rows there: not dropped whole
        assert FEB not in partitions.partitions()  # only acme had rows in February
    assert set(LedgerArchive.objects.values_list("month", "tenant_id")) == {(JAN, acme.id), (FEB, acme.id)}
    assert archive.ledger_upkeep(now=datetime(2026, 5, 10, tzinfo=UTC))["dropped"] == []  # idempotent

    archive.ledger_restore_month(month=JAN, tenant_ids={acme.id})
    assert UsageEvent.objects.filter(tenant=acme).count() == 30


def test_a_tampered_archive_is_not_trusted(ledger, store, tmp_path):
    acme, _globex = ledger
    archive.ledger_archive_month(tenant_id=acme.id, month=JAN)
    path = tmp_path / "archive" / "2026-01" / f"tenant-{acme.id}.csv.gz"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)

    with pytest.raises(archive.ArchiveError, match="checksum"):
        archive.ledger_drop_month(month=JAN, tenant_ids={acme.id})
    assert UsageEvent.objects.filter(tenant=acme).count() == 35
    with pytest.raises(archive.ArchiveError, match="checksum"):
        archive.ledger_restore_month(month=JAN, tenant_ids={acme.id})


def test_a_row_arriving_after_the_archive_is_archived_before_the_drop(ledger, store):
    acme, globex = ledger
    archive.ledger_archive_month(tenant_id=acme.id, month=JAN)
    make_rows(acme, JAN, 1, start=50)  # a late row (journal replay) of the archived month
    with pytest.raises(archive.ArchiveError, match="changed"):
        archive.ledger_drop_month(month=JAN, tenant_ids={acme.id})

    archive.ledger_archive_and_drop(month=JAN, tenant_ids={acme.id})

    assert LedgerArchive.objects.get(tenant=acme, month=JAN).rows == 31
    archive.ledger_restore_month(month=JAN, tenant_ids={acme.id})
    assert UsageEvent.objects.filter(tenant=acme, timestamp__lt=datetime(2026, 2, 1, tzinfo=UTC)).count() == 31


def test_the_current_month_is_never_dropped(ledger, store):
    with pytest.raises(archive.ArchiveError, match="past months"):
        archive.ledger_drop_month(month=datetime.now(UTC).date())


def test_commands_archive_drop_and_restore(ledger, store, capsys):
    acme, _globex = ledger
    before = snapshot()

    call_command("ledger_archive", "--month", "2026-01", "--tenant", "acme")
    assert "30 rows" in capsys.readouterr().out
    assert UsageEvent.objects.count() == 47
    call_command("ledger_archive", "--month", "2026-01", "--drop")
    assert UsageEvent.objects.count() == 5
    call_command("ledger_restore", "--month", "2026-01")
    assert "match the archive" in capsys.readouterr().out
    assert snapshot() == before
    with pytest.raises(CommandError, match="YYYY-MM"):
        call_command("ledger_archive", "--month", "January")
    with pytest.raises(CommandError, match="nothing archived"):
        call_command("ledger_restore", "--month", "2025-06")


def test_the_dashboard_lists_archived_months(ledger, store, client):
    acme, globex = ledger
    manager = f.UserFactory()
    f.MembershipFactory(user=manager, tenant=acme, role="manager")
    archive.ledger_archive_and_drop(month=JAN, tenant_ids={acme.id, globex.id})
    client.force_login(manager)

    resp = client.get("/dashboard/")

    assert resp.status_code == 200
    assert [(a["month"], a["tenant"], a["dropped"]) for a in resp.context["archived"]] == [(JAN, "acme", True)]
    assert b"archived-months" in resp.content and b"2026-01" in resp.content


# --- S3-compatible storage: moto's server on loopback -----------------------------------------------

@pytest.fixture
def s3(settings, monkeypatch):
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "test")
    settings.LEDGER_ARCHIVE_S3_ENDPOINT_URL = f"http://127.0.0.1:{port}"
    settings.LEDGER_ARCHIVE_URL = "s3://ledger-archive/prod/ledger"
    store = archive.archive_store()
    store.client.create_bucket(Bucket="ledger-archive")
    yield store
    # moto keeps its buckets in the process, not per server: forget them for the next test
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    server.stop()


def test_archive_to_s3_drop_and_restore(ledger, s3):
    acme, _globex = ledger
    before, before_totals = snapshot(), totals()

    archive.ledger_archive_and_drop(month=JAN)

    keys = sorted(o["Key"] for o in s3.client.list_objects_v2(Bucket="ledger-archive")["Contents"])
    assert keys == sorted(["prod/ledger/2026-01/manifest.json", f"prod/ledger/2026-01/tenant-{acme.id}.csv.gz",
                           f"prod/ledger/2026-01/tenant-{_globex.id}.csv.gz"])
    location = LedgerArchive.objects.get(tenant=acme).location
    assert location == f"s3://ledger-archive/prod/ledger/2026-01/tenant-{acme.id}.csv.gz"
    assert UsageEvent.objects.count() == 5

    archive.ledger_restore_month(month=JAN)

    assert snapshot() == before and totals() == before_totals


def test_an_archive_written_before_a_column_existed_is_restored_with_its_default(ledger, store, tmp_path):
    """A month archived by an older release has fewer columns (here: no `attempts`); its rows come
    back with the column's default."""
    acme, _globex = ledger
    UsageEvent.objects.filter(tenant=acme).update(attempts=[])
    before = snapshot([acme.id])
    archive.ledger_archive_and_drop(month=JAN, tenant_ids={acme.id})
    path = tmp_path / "archive" / "2026-01" / f"tenant-{acme.id}.csv.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines(keepends=True)
    drop_at = lines[0].rstrip("\r\n").split(",").index("attempts")
    out = io.StringIO()
    writer = csv.writer(out)
    for row in csv.reader(io.StringIO("".join(lines))):
        writer.writerow(row[:drop_at] + row[drop_at + 1:])
    path.write_bytes(gzip.compress(out.getvalue().encode()))
    manifest_path = tmp_path / "archive" / "2026-01" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tenants"][str(acme.id)]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))

    archive.ledger_restore_month(month=JAN, tenant_ids={acme.id})

    assert snapshot([acme.id]) == before


# --- Parquet (LEDGER_ARCHIVE_FORMAT=parquet) ---------------------------------------------------------

def test_a_month_archived_as_parquet_is_dropped_and_restored_with_identical_rows(ledger, store, tmp_path, settings):
    pq = pytest.importorskip("pyarrow.parquet")
    acme, globex = ledger
    settings.LEDGER_ARCHIVE_FORMAT = "parquet"
    before, before_totals = snapshot(), totals()

    archive.ledger_archive_and_drop(month=JAN)

    manifest = json.loads((tmp_path / "archive" / "2026-01" / "manifest.json").read_text())
    entry = manifest["tenants"][str(acme.id)]
    assert entry["file"] == f"2026-01/tenant-{acme.id}.parquet" and entry["format"] == "parquet"
    path = tmp_path / "archive" / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"] == LedgerArchive.objects.get(
        tenant=acme).sha256
    table = pq.read_table(path)
    assert table.column_names == COLUMNS and table.num_rows == 30
    # typed columns: exact decimals, aware timestamps, real nulls
    assert str(table.schema.field("cost").type) == "decimal128(20, 10)"
    assert sum(table.column("cost").to_pylist()) == Decimal(entry["cost"]) == sum(
        r[COLUMNS.index("cost")] for r in before if r[COLUMNS.index("tenant_id")] == acme.id
        and r[COLUMNS.index("timestamp")] < datetime(2026, 2, 1, tzinfo=UTC))
    assert table.column("input_usd_per_mtok").null_count == 15
    assert UsageEvent.objects.count() == 5

    restored = archive.ledger_restore_month(month=JAN)

    assert restored["tenants"][globex.id]["rows"] == 12
    assert snapshot() == before and totals() == before_totals


def test_restores_from_csv_and_from_parquet_give_identical_totals(ledger, store, settings):
    pytest.importorskip("pyarrow")
    acme, globex = ledger
    before, before_totals = snapshot(), totals()
    results = {}
    for fmt in ("csv", "parquet"):
        settings.LEDGER_ARCHIVE_FORMAT = fmt
        archive.ledger_archive_and_drop(month=JAN)
        assert UsageEvent.objects.count() == 5
        results[fmt] = archive.ledger_restore_month(month=JAN)["tenants"]
        assert snapshot() == before and totals() == before_totals

    assert results["csv"] == results["parquet"]
    assert results["parquet"][acme.id]["rows"] == 30 and results["parquet"][globex.id]["rows"] == 12


def test_a_month_archived_partly_as_csv_partly_as_parquet_is_restored(ledger, store, settings):
    """The format is per file (the manifest names it): a tenant archived before the setting changed
    is restored from its CSV, the next one from Parquet."""
    pytest.importorskip("pyarrow")
    acme, globex = ledger
    before = snapshot()
    archive.ledger_archive_month(tenant_id=acme.id, month=JAN)
    settings.LEDGER_ARCHIVE_FORMAT = "parquet"
    archive.ledger_archive_month(tenant_id=globex.id, month=JAN)

    archive.ledger_drop_month(month=JAN)  # checks both files against their records

    assert {a.location.rsplit(".", 1)[-1] for a in LedgerArchive.objects.all()} == {"gz", "parquet"}
    archive.ledger_restore_month(month=JAN)
    assert snapshot() == before


def test_a_tampered_parquet_archive_is_not_trusted(ledger, store, tmp_path, settings):
    pytest.importorskip("pyarrow")
    acme, _globex = ledger
    settings.LEDGER_ARCHIVE_FORMAT = "parquet"
    archive.ledger_archive_month(tenant_id=acme.id, month=JAN)
    path = tmp_path / "archive" / "2026-01" / f"tenant-{acme.id}.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(archive.ArchiveError, match="checksum"):
        archive.ledger_drop_month(month=JAN, tenant_ids={acme.id})
    with pytest.raises(archive.ArchiveError, match="checksum"):
        archive.ledger_restore_month(month=JAN, tenant_ids={acme.id})
    assert UsageEvent.objects.filter(tenant=acme).count() == 35


def test_an_unknown_archive_format_is_refused(ledger, store, settings):
    acme, _globex = ledger
    settings.LEDGER_ARCHIVE_FORMAT = "xlsx"
    with pytest.raises(archive.ArchiveError, match="LEDGER_ARCHIVE_FORMAT"):
        archive.ledger_archive_month(tenant_id=acme.id, month=JAN)
    assert not LedgerArchive.objects.exists()


def test_parquet_archive_to_s3_drop_and_restore(ledger, s3, settings):
    pytest.importorskip("pyarrow")
    acme, globex = ledger
    settings.LEDGER_ARCHIVE_FORMAT = "parquet"
    before, before_totals = snapshot(), totals()

    archive.ledger_archive_and_drop(month=JAN)

    keys = sorted(o["Key"] for o in s3.client.list_objects_v2(Bucket="ledger-archive")["Contents"])
    assert keys == sorted(["prod/ledger/2026-01/manifest.json", f"prod/ledger/2026-01/tenant-{acme.id}.parquet",
                           f"prod/ledger/2026-01/tenant-{globex.id}.parquet"])
    assert UsageEvent.objects.count() == 5

    archive.ledger_restore_month(month=JAN)

    assert snapshot() == before and totals() == before_totals


def test_spend_of_a_total_budget_still_counts_dropped_months(ledger, store):
    """Budget counters are rebuilt from the ledger: a month dropped by retention still counts, from
    the rollups (a `total` budget would otherwise be overspent after a drop)."""
    from apps.analytics.selectors import ledger_cost_sums
    from apps.billing.periods import EPOCH

    acme, globex = ledger
    key_name = UsageEvent.objects.filter(tenant=acme, api_key__isnull=False).first().api_key.name
    items = [("tenant", acme.id, "tenant", "", EPOCH, None), ("b1", acme.id, "budget_id", "b1", EPOCH, None),
             ("key", acme.id, "key", key_name, EPOCH, None), ("globex", globex.id, "tenant", "", EPOCH, None),
             ("feb", acme.id, "tenant", "", datetime(2026, 2, 1, tzinfo=UTC), None)]
    before = ledger_cost_sums(items=items)
    assert before["tenant"] > before["feb"] > 0 and before["key"] > 0

    archive.ledger_archive_and_drop(month=JAN)

    assert UsageEvent.objects.filter(tenant=acme).count() == 5
    assert ledger_cost_sums(items=items) == before
