# ruff: noqa: S608 - every name in these statements is one of our own constants, values are parameters
"""The ledger's monthly partitions on PostgreSQL (the embedded SQLite default keeps one table).

`analytics_usageevent` is range-partitioned by month (UTC) on `timestamp`: one partition
`analytics_usageevent_pYYYY_MM` per month, plus `analytics_usageevent_default` for a row outside
every partition (normally empty; a partition created later takes its rows over). Partitions are
created ahead (LEDGER_PARTITIONS_AHEAD months) by `migrate` and by the beat task
`analytics.ledger_partitions_ensure`, and dropped by retention after they were archived
(apps/analytics/archive.py).

Idempotency by request id. A unique key of a partitioned table must contain the partition key, so
`request_id` alone cannot be unique in the ledger itself. It is unique in a separate table,
`analytics_usageeventrequest` (request_id primary key, timestamp), and a BEFORE INSERT trigger of the
ledger writes there first, in the same statement: the row goes into the ledger only if its request
id was new (`INSERT ... ON CONFLICT DO NOTHING`, then `FOUND`). Every path that writes the ledger
(the gateway's group commit, the ORM, journal replay, restore) goes through it, and it does not look
at the timestamp: a request that starts at 23:59:59 on the last day of a month and is written again
at 00:00:01 (a retry, a journal replay) has one id, so one row, whichever month either copy names.
Two concurrent inserts of one id serialize on the primary key of that table: the second waits for
the first to commit, then skips (or inserts, if the first rolled back).
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from django.conf import settings
from django.db import connection, transaction

TABLE = "analytics_usageevent"
IDEMPOTENCY_TABLE = "analytics_usageeventrequest"
DEFAULT_PARTITION = f"{TABLE}_default"
TRIGGER = "analytics_usageevent_request_id_once"
FUNCTION = "analytics_usageevent_request_id_once"


def month_start(d: date | datetime) -> date:
    return date(d.year, d.month, 1)


def month_add(d: date, months: int) -> date:
    m = d.year * 12 + d.month - 1 + months
    return date(m // 12, m % 12 + 1, 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC month, as aware datetimes."""
    start = month_start(month)
    end = month_add(start, 1)
    return (datetime(start.year, start.month, 1, tzinfo=UTC), datetime(end.year, end.month, 1, tzinfo=UTC))


def parse_month(text: str) -> date:
    """'YYYY-MM' -> the first day of that month."""
    try:
        return datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC).date()
    except ValueError:
        raise ValueError(f"month {text!r}: expected YYYY-MM") from None


def partition_name(month: date) -> str:
    return f"{TABLE}_p{month.year:04d}_{month.month:02d}"


def is_partitioned(conn=None) -> bool:
    conn = conn or connection
    if conn.vendor != "postgresql":
        return False
    with conn.cursor() as cur:
        cur.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", [TABLE])
        row = cur.fetchone()
    return bool(row) and row[0] == "p"


def partitions(conn=None) -> dict[date, str]:
    """The ledger's monthly partitions, by month (the default partition is not listed)."""
    conn = conn or connection
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(%s)", [TABLE])
        names = [r[0] for r in cur.fetchall()]
    out = {}
    for name in names:
        suffix = name.removeprefix(f"{TABLE}_p")
        if suffix != name:
            year, month = suffix.split("_")
            out[date(int(year), int(month), 1)] = name
    return dict(sorted(out.items()))


def partition_ensure(month: date, conn=None) -> bool:
    """Create the partition of `month` if missing; True if it was created. Rows of that month that
    sit in the default partition move into it (in one transaction: none is lost or seen twice)."""
    conn = conn or connection
    month = month_start(month)
    name = partition_name(month)
    start, end = month_bounds(month)
    with transaction.atomic(using=conn.alias), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        if cur.fetchone()[0]:
            return False
        # Serialize creators (migrate and beat at once) and lock out writers of the default.
        cur.execute(f'LOCK TABLE "{TABLE}" IN SHARE ROW EXCLUSIVE MODE')
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        if cur.fetchone()[0]:
            return False
        cur.execute(f'SELECT EXISTS (SELECT 1 FROM "{DEFAULT_PARTITION}" '
                    'WHERE "timestamp" >= %s AND "timestamp" < %s)', [start, end])
        if not cur.fetchone()[0]:
            cur.execute(f'CREATE TABLE "{name}" PARTITION OF "{TABLE}" FOR VALUES FROM (%s) TO (%s)', [start, end])
            return True
        # Rows of that month were written before its partition existed: move them. A plain table
        # takes them (no trigger: their request ids are already in the idempotency table), then is
        # attached, which builds its indexes and clones the trigger.
        cur.execute(f'CREATE TABLE "{name}" (LIKE "{TABLE}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS)')
        cur.execute(f'WITH moved AS (DELETE FROM "{DEFAULT_PARTITION}" WHERE "timestamp" >= %s AND "timestamp" < %s '
                    f'RETURNING *) INSERT INTO "{name}" SELECT * FROM moved', [start, end])
        cur.execute(f'ALTER TABLE "{TABLE}" ATTACH PARTITION "{name}" FOR VALUES FROM (%s) TO (%s)', [start, end])
        return True


def partitions_ensure(*, now: datetime | None = None, ahead: int | None = None, conn=None) -> list[str]:
    """The current month's partition and `ahead` more (LEDGER_PARTITIONS_AHEAD); returns those created.
    A no-op where the ledger is not partitioned (SQLite)."""
    conn = conn or connection
    if not is_partitioned(conn):
        return []
    now = now or datetime.now(UTC)
    ahead = settings.LEDGER_PARTITIONS_AHEAD if ahead is None else ahead
    first = month_start(now.astimezone(UTC))
    created = []
    for i in range(ahead + 1):
        month = month_add(first, i)
        if partition_ensure(month, conn):
            created.append(partition_name(month))
    return created


def partition_drop(month: date, conn=None) -> bool:
    """Drop a month's partition and forget its request ids (call only after it was archived).
    True if there was one."""
    conn = conn or connection
    name = partition_name(month_start(month))
    start, end = month_bounds(month)
    with transaction.atomic(using=conn.alias), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        if not cur.fetchone()[0]:
            return False
        # Deferred constraint checks of rows written in this transaction (if any) run before the drop.
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cur.execute(f'DROP TABLE "{name}"')
        cur.execute(f'DELETE FROM "{IDEMPOTENCY_TABLE}" WHERE "timestamp" >= %s AND "timestamp" < %s',
                    [start, end])
        return True


# --- the conversion of an unpartitioned ledger (migration 0003) ----------------------------------

_TRIGGER_SQL = f"""
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One row per request id, whatever month its timestamp names (apps/analytics/partitions.py).
    INSERT INTO "{IDEMPOTENCY_TABLE}" ("request_id", "timestamp") VALUES (NEW."request_id", NEW."timestamp")
        ON CONFLICT ("request_id") DO NOTHING;
    IF FOUND THEN
        RETURN NEW;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER {TRIGGER} BEFORE INSERT ON "{TABLE}" FOR EACH ROW EXECUTE FUNCTION {FUNCTION}();
"""

# The indexes of the unpartitioned table, by name, minus the unique constraint on request_id (now
# the idempotency table's primary key) and the LIKE-pattern index nothing uses.
_INDEXES = [
    ("analytics_usageevent_request_id_6b730817", '"request_id"'),
    ("analytics_u_tenant__074f4a_idx", '"tenant_id", "timestamp"'),
    ("analytics_usageevent_timestamp_dd3379dd", '"timestamp"'),
    ("analytics_usageevent_batch_id_69475223", '"batch_id"'),
    ("analytics_usageevent_api_key_id_acecb4bc", '"api_key_id"'),
    ("analytics_usageevent_deployment_id_de66f45e", '"deployment_id"'),
    ("analytics_usageevent_price_id_49328db7", '"price_id"'),
    ("analytics_usageevent_source_id_5c798b94", '"source_id"'),
    ("analytics_usageevent_tenant_id_d7e9ffcd", '"tenant_id"'),
]
_FKS = [
    ("api_key_id", "keys_apikey"), ("deployment_id", "gateway_deployment"), ("price_id", "billing_price"),
    ("source_id", "keys_source"), ("tenant_id", "keys_tenant"),
]


def convert_to_partitioned(schema_editor) -> None:
    """Turn the unpartitioned ledger into the partitioned one, keeping every row and its id.

    Runs in the migration's transaction with the old table locked: the new table is built beside
    it, every row copied with its id, the request ids copied into the idempotency table, the old
    table dropped and the new one renamed into its place; only then the trigger and indexes."""
    conn = schema_editor.connection
    if conn.vendor != "postgresql" or is_partitioned(conn):
        return
    old, new = f"{TABLE}_unpartitioned", f"{TABLE}_new"
    with conn.cursor() as cur:
        cur.execute(f'LOCK TABLE "{TABLE}" IN ACCESS EXCLUSIVE MODE')
        cur.execute(f'ALTER TABLE "{TABLE}" RENAME TO "{old}"')
        cur.execute(f'CREATE TABLE "{new}" (LIKE "{old}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                    f'INCLUDING IDENTITY, PRIMARY KEY ("id", "timestamp")) PARTITION BY RANGE ("timestamp")')
        cur.execute(f'CREATE TABLE "{DEFAULT_PARTITION}" PARTITION OF "{new}" DEFAULT')
        cur.execute(f'SELECT DISTINCT date_trunc(\'month\', "timestamp" AT TIME ZONE \'UTC\')::date FROM "{old}"')
        months = sorted(r[0] for r in cur.fetchall())
        for month in months:
            start, end = month_bounds(month)
            cur.execute(f'CREATE TABLE "{partition_name(month)}" PARTITION OF "{new}" FOR VALUES FROM (%s) TO (%s)',
                        [start, end])
        cur.execute(f'INSERT INTO "{new}" SELECT * FROM "{old}"')
        cur.execute(f'INSERT INTO "{IDEMPOTENCY_TABLE}" ("request_id", "timestamp") '
                    f'SELECT "request_id", "timestamp" FROM "{old}"')
        cur.execute(f'SELECT setval(pg_get_serial_sequence(%s, \'id\'), '
                    f'GREATEST((SELECT max("id") FROM "{old}"), (SELECT last_value FROM '
                    f'{_seq(cur, old)})), true)', [new])
        cur.execute(f'DROP TABLE "{old}"')
        cur.execute(f'ALTER TABLE "{new}" RENAME TO "{TABLE}"')
        cur.execute(f'ALTER SEQUENCE {_seq(cur, TABLE)} RENAME TO "{TABLE}_id_seq"')
        cur.execute(f'ALTER TABLE "{TABLE}" RENAME CONSTRAINT "{new}_pkey" TO "{TABLE}_pkey"')
        for name, cols in _INDEXES:
            cur.execute(f'CREATE INDEX "{name}" ON "{TABLE}" ({cols})')
        for col, target in _FKS:
            cur.execute(f'ALTER TABLE "{TABLE}" ADD CONSTRAINT "{TABLE}_{col}_fk_{target}" FOREIGN KEY ("{col}") '
                        f'REFERENCES "{target}" ("id") DEFERRABLE INITIALLY DEFERRED')
        cur.execute(_TRIGGER_SQL)


def _seq(cur, table: str) -> str:
    cur.execute("SELECT pg_get_serial_sequence(%s, 'id')", [table])
    return cur.fetchone()[0]


def convert_to_unpartitioned(schema_editor) -> None:
    """The reverse of convert_to_partitioned: one plain table again, every row and id kept."""
    conn = schema_editor.connection
    if conn.vendor != "postgresql" or not is_partitioned(conn):
        return
    old, new = f"{TABLE}_partitioned", f"{TABLE}_new"
    with conn.cursor() as cur:
        cur.execute(f'LOCK TABLE "{TABLE}" IN ACCESS EXCLUSIVE MODE')
        cur.execute(f'ALTER TABLE "{TABLE}" RENAME TO "{old}"')
        cur.execute(f'ALTER TABLE "{old}" RENAME CONSTRAINT "{TABLE}_pkey" TO "{old}_pkey"')
        cur.execute(f'CREATE TABLE "{new}" (LIKE "{old}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                    f'INCLUDING IDENTITY)')
        cur.execute(f'INSERT INTO "{new}" SELECT * FROM "{old}"')
        cur.execute(f'SELECT setval(pg_get_serial_sequence(%s, \'id\'), GREATEST((SELECT max("id") FROM "{old}"), '
                    f'(SELECT last_value FROM {_seq(cur, old)})), true)', [new])
        cur.execute(f'DROP TABLE "{old}" CASCADE')
        cur.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}()")
        cur.execute(f'ALTER TABLE "{new}" RENAME TO "{TABLE}"')
        cur.execute(f'ALTER SEQUENCE {_seq(cur, TABLE)} RENAME TO "{TABLE}_id_seq"')
        cur.execute(f'ALTER TABLE "{TABLE}" ADD CONSTRAINT "{TABLE}_pkey" PRIMARY KEY ("id")')
        cur.execute(f'ALTER TABLE "{TABLE}" ADD CONSTRAINT "{TABLE}_request_id_key" UNIQUE ("request_id")')
        cur.execute(f'CREATE INDEX "analytics_usageevent_request_id_6b730817_like" ON "{TABLE}" '
                    '("request_id" varchar_pattern_ops)')
        cur.execute(f'CREATE INDEX "analytics_usageevent_batch_id_69475223_like" ON "{TABLE}" '
                    '("batch_id" varchar_pattern_ops)')
        for name, cols in _INDEXES[1:]:
            cur.execute(f'CREATE INDEX "{name}" ON "{TABLE}" ({cols})')
        for col, target in _FKS:
            cur.execute(f'ALTER TABLE "{TABLE}" ADD CONSTRAINT "{TABLE}_{col}_fk_{target}" FOREIGN KEY ("{col}") '
                        f'REFERENCES "{target}" ("id") DEFERRABLE INITIALLY DEFERRED')
