"""Retention and archive of the ledger: a tenant's detailed rows are kept N months (LedgerRetention,
else LEDGER_RETENTION_MONTHS; rollups forever), then archived and dropped.

- **Archive** (`ledger_archive_month`): one tenant's rows of one UTC month go to a gzip'ed CSV (every
  column, `\\N` for NULL) or, with LEDGER_ARCHIVE_FORMAT=parquet, a Parquet file (pyarrow, zstd,
  typed columns) in the archive store (LEDGER_ARCHIVE_URL: a local directory, or
  `s3://bucket/prefix` on any S3-compatible storage through boto3), at `YYYY-MM/tenant-<id>.csv.gz`
  (or `.parquet`),
  listed with its SHA-256, size, row count and totals in `YYYY-MM/manifest.json` and in a
  `LedgerArchive` row (what the dashboard shows).
- **Drop** (`ledger_drop_month`): only rows that were archived, and only after the stored file was
  read back and its checksum matched. The rows are counted and summed again under a lock; if they
  differ from the archive (a late row arrived), the month is archived again first. When every
  tenant of a month goes, the month's partition is dropped whole (PostgreSQL); otherwise the
  tenant's rows are deleted. Their request ids are forgotten with them (so a restore can put them
  back).
- **Restore** (`ledger_restore_month`): reads the files back (either format, whatever the setting
  now: each manifest entry names its file), checks each checksum, inserts the rows with their ids
  (COPY on the partitioned ledger; idempotent: rows still there are skipped), and checks the totals
  equal the manifest's.
- `ledger_upkeep` (beat, hourly) creates partitions ahead and applies retention.

Months are UTC months, like the partitions.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Sum
from django.utils import timezone

from . import partitions
from .models import LedgerArchive, LedgerRetention, UsageEvent

log = logging.getLogger(__name__)

NULL = r"\N"
ARCHIVE_LOCK_ID = 7_000_002
CHUNK = 5000


class ArchiveError(Exception):
    """An archive that cannot be written, read back or trusted (checksum, totals)."""


# --- stores -------------------------------------------------------------------------------------

class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def location(self, key: str) -> str:
        return str(self.root / key)

    def put_file(self, key: str, path: Path) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self.root / key, path)
        except FileNotFoundError:
            raise ArchiveError(f"{self.location(key)}: not in the archive") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(delete=False) as fh:
            fh.write(data)
        try:
            self.put_file(key, Path(fh.name))
        finally:
            os.unlink(fh.name)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None


class S3Store:
    def __init__(self, bucket: str, prefix: str = ""):
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=settings.LEDGER_ARCHIVE_S3_ENDPOINT_URL or None,
                                   region_name=settings.LEDGER_ARCHIVE_S3_REGION)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except ClientError as exc:
            raise ArchiveError(f"{self.location(key)}: {exc}") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None


def archive_store(url: str | None = None):
    url = url or settings.LEDGER_ARCHIVE_URL
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3Store(bucket, prefix)
    return LocalStore(url.removeprefix("file://"))


# --- archive ------------------------------------------------------------------------------------

def _columns() -> list:
    return list(UsageEvent._meta.concrete_fields)


def _cell(value) -> str:
    if value is None:
        return NULL
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict | list):  # a JSON column (the upstream attempts): as JSON, not Python's repr
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _uncell(field, value: str):
    if value == NULL:
        return None
    if field.get_internal_type() == "JSONField":
        return json.loads(value)
    return field.to_python(value)


@dataclass
class Totals:
    rows: int = 0
    cost: Decimal = Decimal(0)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "cost": f"{self.cost:f}", "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}

    def same_as(self, other: Totals) -> bool:
        return (self.rows, self.cost, self.prompt_tokens, self.completion_tokens) == (
            other.rows, other.cost, other.prompt_tokens, other.completion_tokens)


def _month_rows(tenant_id: int, month: date):
    start, end = partitions.month_bounds(month)
    return UsageEvent.objects.filter(tenant_id=tenant_id, timestamp__gte=start, timestamp__lt=end)


def ledger_totals(*, tenant_id: int, month: date) -> Totals:
    agg = _month_rows(tenant_id, month).order_by().aggregate(
        rows=Count("id"), cost=Sum("cost"), p=Sum("prompt_tokens"), c=Sum("completion_tokens"))
    return Totals(agg["rows"], (agg["cost"] or Decimal(0)).normalize() if agg["rows"] else Decimal(0),
                  agg["p"] or 0, agg["c"] or 0)


FORMATS = {"csv": "csv.gz", "parquet": "parquet"}  # LEDGER_ARCHIVE_FORMAT -> file suffix


def archive_format() -> str:
    fmt = settings.LEDGER_ARCHIVE_FORMAT
    if fmt not in FORMATS:
        raise ArchiveError(f"LEDGER_ARCHIVE_FORMAT={fmt!r}: one of {', '.join(FORMATS)}")
    return fmt


def _key(month: date, tenant_id: int, fmt: str = "csv") -> str:
    return f"{month:%Y-%m}/tenant-{tenant_id}.{FORMATS[fmt]}"


def _format_of(name: str) -> str:
    """The format of an archived file, from its name (a record's location or a manifest's file)."""
    return "parquet" if name.endswith(".parquet") else "csv"


# --- file formats: gzip'ed CSV, or Parquet (pyarrow) --------------------------------------------

class _CsvOut:
    def __init__(self, path: Path, fields: list):
        self.gz = gzip.open(path, "wt", newline="", encoding="utf-8", compresslevel=6)  # noqa: SIM115 - closed by close()
        self.writer = csv.writer(self.gz)
        self.writer.writerow([f.attname for f in fields])

    def write(self, rows: list[tuple]) -> None:
        self.writer.writerows([_cell(v) for v in row] for row in rows)

    def close(self) -> None:
        self.gz.close()


def _arrow_type(field):
    import pyarrow as pa

    kind = field.get_internal_type()
    if kind == "DateTimeField":
        return pa.timestamp("us", tz="UTC")
    if kind == "DecimalField":
        return pa.decimal128(field.max_digits, field.decimal_places)
    if kind == "BooleanField":
        return pa.bool_()
    if kind in ("CharField", "TextField", "JSONField"):  # JSON as its text, as in the CSV
        return pa.string()
    return pa.int64()  # ids, foreign keys, counters


def _arrow_schema(fields: list):
    import pyarrow as pa

    return pa.schema([pa.field(f.attname, _arrow_type(f), nullable=f.null) for f in fields])


class _ParquetOut:
    def __init__(self, path: Path, fields: list):
        import pyarrow.parquet as pq

        self.schema = _arrow_schema(fields)
        self.json_at = [i for i, f in enumerate(fields) if f.get_internal_type() == "JSONField"]
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")

    def write(self, rows: list[tuple]) -> None:
        import pyarrow as pa

        columns = [list(c) for c in zip(*rows, strict=True)]
        for i in self.json_at:
            columns[i] = [None if v is None else json.dumps(v, separators=(",", ":"), sort_keys=True)
                          for v in columns[i]]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def _read_rows(path: Path, fmt: str, fields: dict):
    """Batches of rows (dicts by attname, Python values) of an archived file."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        json_names = [n for n, f in fields.items() if f.get_internal_type() == "JSONField"]
        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK):
            rows = batch.to_pylist()
            for row in rows:
                for n in json_names:
                    if row[n] is not None:
                        row[n] = json.loads(row[n])
            yield rows
        return
    with gzip.open(path, "rt", newline="", encoding="utf-8") as gz:
        reader = csv.reader(gz)
        header = next(reader)
        batch = []
        for line in reader:
            batch.append({name: _uncell(fields[name], value) for name, value in zip(header, line, strict=True)})
            if len(batch) >= CHUNK:
                yield batch
                batch = []
        if batch:
            yield batch


def _manifest_key(month: date) -> str:
    return f"{month:%Y-%m}/manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lock() -> None:
    """One archiver, dropper or restorer at a time (PostgreSQL; call inside a transaction)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", [ARCHIVE_LOCK_ID])


def ledger_archive_month(*, tenant_id: int, month: date, store=None) -> LedgerArchive:
    """Write one tenant's rows of one month to the archive store and record it. Idempotent: archiving
    again rewrites the file from the rows there now (an archive of dropped rows is never overwritten)."""
    from apps.keys.models import Tenant

    store = store or archive_store()
    fmt = archive_format()
    month = partitions.month_start(month)
    existing = LedgerArchive.objects.filter(tenant_id=tenant_id, month=month, dropped_at__isnull=False).first()
    if existing:
        return existing
    fields = _columns()
    totals = Totals()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows.{FORMATS[fmt]}"
        with transaction.atomic():
            _lock()
            out = (_ParquetOut if fmt == "parquet" else _CsvOut)(path, fields)
            try:
                qs = _month_rows(tenant_id, month).order_by("timestamp", "id").values_list(
                    *[f.attname for f in fields])
                i_cost, i_p, i_c = (next(i for i, f in enumerate(fields) if f.attname == n)
                                    for n in ("cost", "prompt_tokens", "completion_tokens"))
                batch = []
                for row in qs.iterator(chunk_size=CHUNK):
                    batch.append(row)
                    totals.rows += 1
                    totals.cost += row[i_cost]
                    totals.prompt_tokens += row[i_p]
                    totals.completion_tokens += row[i_c]
                    if len(batch) >= CHUNK:
                        out.write(batch)
                        batch = []
                if batch:
                    out.write(batch)
            finally:
                out.close()
            totals.cost = totals.cost.normalize() if totals.rows else Decimal(0)
            digest, size = _sha256(path), path.stat().st_size
            key = _key(month, tenant_id, fmt)
            store.put_file(key, path)
            manifest = _manifest_read(store, month)
            manifest["tenants"][str(tenant_id)] = {
                "tenant": Tenant.objects.filter(id=tenant_id).values_list("slug", flat=True).first(),
                "file": key, "format": FORMATS[fmt], "sha256": digest, "bytes": size, **totals.as_dict(),
                "archived_at": timezone.now().isoformat()}
            store.put_bytes(_manifest_key(month), json.dumps(manifest, indent=2, sort_keys=True).encode())
            archive, _ = LedgerArchive.objects.update_or_create(
                tenant_id=tenant_id, month=month,
                defaults={"location": store.location(key), "sha256": digest, "size_bytes": size,
                          "rows": totals.rows, "cost": totals.cost, "prompt_tokens": totals.prompt_tokens,
                          "completion_tokens": totals.completion_tokens, "archived_at": timezone.now(),
                          "dropped_at": None})
    log.info("ledger archive: tenant %s %s: %s rows to %s", tenant_id, f"{month:%Y-%m}", totals.rows,
             store.location(key))
    return archive


def _manifest_read(store, month: date) -> dict:
    raw = store.get_bytes(_manifest_key(month))
    if raw is None:
        # Each tenant's entry names its file and format (csv.gz or parquet: LEDGER_ARCHIVE_FORMAT when
        # it was archived); `null` is how the CSVs write NULL (Parquet has real nulls).
        return {"month": f"{month:%Y-%m}", "null": NULL,
                "columns": [f.attname for f in _columns()], "tenants": {}}
    return json.loads(raw)


def _verify(store, archive: LedgerArchive, path: Path) -> None:
    store.get_file(_key(archive.month, archive.tenant_id, _format_of(archive.location)), path)
    digest = _sha256(path)
    if digest != archive.sha256:
        raise ArchiveError(f"{archive.location}: checksum {digest} != recorded {archive.sha256}")


def _archive_totals(archive: LedgerArchive) -> Totals:
    return Totals(archive.rows, archive.cost.normalize() if archive.rows else Decimal(0), archive.prompt_tokens,
                  archive.completion_tokens)


def month_tenants(month: date) -> set[int]:
    start, end = partitions.month_bounds(month)
    return set(UsageEvent.objects.filter(timestamp__gte=start, timestamp__lt=end).order_by()
               .values_list("tenant_id", flat=True).distinct())


def ledger_drop_month(*, month: date, tenant_ids: set[int] | None = None, store=None) -> dict:
    """Drop archived rows of `month` (every tenant's, or those of `tenant_ids`): each tenant's archive
    is read back and checked first; a tenant whose rows changed since is archived again. The whole
    partition goes when no other tenant has rows in it. Never the current month or a later one."""
    store = store or archive_store()
    month = partitions.month_start(month)
    if month >= partitions.month_start(timezone.now().astimezone(UTC)):
        raise ArchiveError(f"{month:%Y-%m}: only past months are dropped")
    present = month_tenants(month)
    targets = present if tenant_ids is None else present & set(tenant_ids)
    with tempfile.TemporaryDirectory() as tmp:
        for tenant_id in sorted(targets):
            archive = LedgerArchive.objects.filter(tenant_id=tenant_id, month=month).first()
            if archive is None:
                raise ArchiveError(f"tenant {tenant_id} {month:%Y-%m}: not archived, not dropped")
            _verify(store, archive, Path(tmp) / f"tenant-{tenant_id}")
    dropped: list[int] = []
    whole = False
    with transaction.atomic():
        _lock()
        name = partitions.partition_name(month)
        use_partition = partitions.is_partitioned() and targets == month_tenants(month) and name in \
            partitions.partitions().values()
        if use_partition:  # no writer may add a row between the check and the drop
            with connection.cursor() as cur:
                cur.execute(f'LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE')
        for tenant_id in sorted(targets):
            archive = LedgerArchive.objects.get(tenant_id=tenant_id, month=month)
            if not ledger_totals(tenant_id=tenant_id, month=month).same_as(_archive_totals(archive)):
                raise _Stale(tenant_id)
        # The rollups (kept forever; what budgets of a `total` period and the dashboards read for a
        # dropped month) are brought up to date from the rows while they are still here.
        from .services import usage_rollup_recompute

        usage_rollup_recompute(since=partitions.month_bounds(month)[0], until=partitions.month_bounds(month)[1])
        if use_partition and targets == month_tenants(month):
            partitions.partition_drop(month)
            whole = True
        else:
            for tenant_id in sorted(targets):
                _delete_rows(tenant_id, month)
        LedgerArchive.objects.filter(tenant_id__in=targets, month=month).update(dropped_at=timezone.now())
        dropped = sorted(targets)
    return {"month": f"{month:%Y-%m}", "tenants": dropped, "partition_dropped": whole}


class _Stale(ArchiveError):
    def __init__(self, tenant_id: int):
        super().__init__(f"tenant {tenant_id}: rows changed since the archive")
        self.tenant_id = tenant_id


def _delete_rows(tenant_id: int, month: date) -> None:
    start, end = partitions.month_bounds(month)
    if partitions.is_partitioned():
        with connection.cursor() as cur:
            cur.execute(
                f'WITH gone AS (DELETE FROM "{partitions.TABLE}" WHERE "tenant_id" = %s AND "timestamp" >= %s '  # noqa: S608
                f'AND "timestamp" < %s RETURNING "request_id") DELETE FROM "{partitions.IDEMPOTENCY_TABLE}" '
                'WHERE "request_id" IN (SELECT "request_id" FROM gone)', [tenant_id, start, end])
    else:
        _month_rows(tenant_id, month).delete()


def ledger_archive_and_drop(*, month: date, tenant_ids: set[int] | None = None, store=None) -> dict:
    """Archive (the tenants not archived yet, or whose rows changed) then drop."""
    store = store or archive_store()
    month = partitions.month_start(month)
    targets = month_tenants(month) if tenant_ids is None else month_tenants(month) & set(tenant_ids)
    for tenant_id in sorted(targets):
        archive = LedgerArchive.objects.filter(tenant_id=tenant_id, month=month).first()
        if archive is None or not ledger_totals(tenant_id=tenant_id, month=month).same_as(_archive_totals(archive)):
            ledger_archive_month(tenant_id=tenant_id, month=month, store=store)
    for _attempt in range(3):
        try:
            return ledger_drop_month(month=month, tenant_ids=tenant_ids, store=store)
        except _Stale as exc:  # a late row: archive that tenant again, then retry
            LedgerArchive.objects.filter(tenant_id=exc.tenant_id, month=month).update(dropped_at=None)
            ledger_archive_month(tenant_id=exc.tenant_id, month=month, store=store)
    raise ArchiveError(f"{month:%Y-%m}: rows keep changing; not dropped")


# --- restore ------------------------------------------------------------------------------------

def ledger_restore_month(*, month: date, tenant_ids: set[int] | None = None, store=None) -> dict:
    """Put archived rows of `month` back into the ledger, with their ids; returns per-tenant totals,
    each checked equal to the manifest's."""
    store = store or archive_store()
    month = partitions.month_start(month)
    manifest = _manifest_read(store, month)
    entries = {int(t): e for t, e in manifest["tenants"].items() if tenant_ids is None or int(t) in tenant_ids}
    if not entries:
        raise ArchiveError(f"{month:%Y-%m}: nothing archived" + (" for these tenants" if tenant_ids else ""))
    if partitions.is_partitioned():
        partitions.partition_ensure(month)
    fields = {f.attname: f for f in _columns()}
    restored = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tenant_id, entry in sorted(entries.items()):
            fmt = _format_of(entry["file"])
            path = Path(tmp) / f"{tenant_id}.{FORMATS[fmt]}"
            store.get_file(entry["file"], path)
            if _sha256(path) != entry["sha256"]:
                raise ArchiveError(f"{store.location(entry['file'])}: checksum does not match the manifest")
            with transaction.atomic():
                _lock()
                copy = partitions.is_partitioned()
                for rows in _read_rows(path, fmt, fields):
                    if copy:
                        _copy_rows(rows, fields)
                    else:
                        UsageEvent.objects.insert_new([UsageEvent(**row) for row in rows])
                _sequence_past_ids()
                totals = ledger_totals(tenant_id=tenant_id, month=month)
                expected = Totals(entry["rows"], Decimal(entry["cost"]), entry["prompt_tokens"],
                                  entry["completion_tokens"])
                if not totals.same_as(expected):
                    raise ArchiveError(f"tenant {tenant_id} {month:%Y-%m}: restored totals {totals.as_dict()} != "
                                       f"archived {expected.as_dict()}")
                LedgerArchive.objects.filter(tenant_id=tenant_id, month=month).update(dropped_at=None)
            restored[tenant_id] = totals.as_dict()
    return {"month": f"{month:%Y-%m}", "tenants": restored}


def _copy_rows(rows: list[dict], fields: dict) -> None:
    """Rows into the partitioned ledger with COPY (several times faster than INSERTs of ORM objects:
    docs/ledger-at-scale.md). A row whose request id is still there is skipped by the partition
    trigger, as for an INSERT (so a restore stays idempotent)."""
    from psycopg.types.json import Jsonb

    names = [n for n in fields if n in rows[0]]  # an older archive may lack a newer column: its default
    json_at = [i for i, n in enumerate(names) if fields[n].get_internal_type() == "JSONField"]
    cols = ", ".join(f'"{fields[n].column}"' for n in names)
    with connection.cursor() as cur, cur.cursor.copy(f'COPY "{partitions.TABLE}" ({cols}) FROM STDIN') as copy:
        for row in rows:
            values = [row[n] for n in names]
            for i in json_at:
                values[i] = Jsonb(values[i])
            copy.write_row(values)


def _sequence_past_ids() -> None:
    """Rows came back with explicit ids: keep the id sequence beyond them (into an empty database,
    say). Only ever moved forward: lowering it could hand out an id a writer in flight holds."""
    if connection.vendor != "postgresql":
        return  # SQLite takes max(rowid) + 1
    with connection.cursor() as cur:
        cur.execute("SELECT pg_get_serial_sequence(%s, 'id')", [partitions.TABLE])
        seq = cur.fetchone()[0]
        cur.execute(f'SELECT setval(%s::regclass, GREATEST((SELECT max("id") FROM "{partitions.TABLE}"), '  # noqa: S608
                    f'(SELECT last_value FROM {seq})))', [seq])


# --- retention ----------------------------------------------------------------------------------

def retention_months(tenant_id: int) -> int:
    own = LedgerRetention.objects.filter(tenant_id=tenant_id).values_list("months", flat=True).first()
    return settings.LEDGER_RETENTION_MONTHS if own is None else own


def ledger_retention_apply(*, now: datetime | None = None, store=None) -> list[dict]:
    """Archive and drop every tenant-month past its tenant's retention; a month whose tenants are all
    due goes as one partition."""
    now = now or timezone.now()
    current = partitions.month_start(now.astimezone(UTC))
    done = []
    oldest = UsageEvent.objects.order_by("timestamp").values_list("timestamp", flat=True).first()
    if oldest is None:
        return done
    month = partitions.month_start(oldest.astimezone(UTC))
    while month < current:
        due = {t for t in month_tenants(month)
               if (keep := retention_months(t)) and month < partitions.month_add(current, -keep)}
        if due:
            done.append(ledger_archive_and_drop(month=month, tenant_ids=due, store=store))
        month = partitions.month_add(month, 1)
    return done


def ledger_upkeep(*, now: datetime | None = None) -> dict:
    created = partitions.partitions_ensure(now=now)
    dropped = ledger_retention_apply(now=now)
    return {"created": created, "dropped": dropped}
