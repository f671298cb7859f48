"""The ledger at scale: grow a synthetic ledger in steps and measure, at each size, what matters.

    make bench-ledger ROWS=1000000,2000000,4000000 [MINUTES=25]
    # = DATABASE_URL=postgres://.../DB_bench nice -n 10 python bench/ledger_scale.py --sizes ... --minutes ...

PostgreSQL only, and only on a database whose name ends in `_bench` (the script truncates the
ledger, its rollups and archives first; --keep to grow an existing one). Per step:

- generation: realistic rows (the same generator as `manage.py usage_generate`: five models, eight
  sources, 24 keys with a long tail, working-hour peaks, 3.5% errors, 8% cache hits) for several
  tenants (skewed: 40/25/15/10/10 %), spread over the last --months whole UTC months and the
  current one, `COPY`'d into the partitioned ledger (the idempotency trigger runs for every row);
  then the rollups of the whole window by the real code (`usage_rollup_recompute`).
- insert rate through the gateway's ledger writer (`usage_event_record`, GATEWAY_LEDGER_WRITER=batch:
  the async pool's group commit, the path /v1 uses), with --writer-concurrency requests in flight;
  and the same rows through a COPY variant of the group commit (for comparison only).
- the beat's rollup run (`usage_rollup_recent`, the last ANALYTICS_ROLLUP_LOOKBACK_H hours).
- latencies of the dashboard page (/dashboard/, 7 and 30 days, the biggest tenant), the analytics
  API (/api/analytics/dashboard/), the ledger API (/api/usage-events/, first page and 5 pages
  deep): Django's test client in this process, the real views, median of --repeat runs.
- CSV export of the biggest tenant's last whole month: `manage.py usage_export --format csv` and
  the dashboard's /dashboard/usage.csv, rows/s.
- at the first and last step (--archive-at): `ledger_archive` + drop of the oldest month (every
  tenant: the partition is dropped whole), then `ledger_restore` of it, seconds and bytes.

With --existing, nothing is generated: on the ledger already there, the beat's rollup run (median
of --repeat) and one archive/drop/restore cycle per --formats (csv, parquet): the figures after a
change, on the same rows.

The load average is recorded before and after each step (the machine may be shared). Results go
to --out (JSON) and a summary with the fitted slopes (least squares over the steps) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("LLMS_DEMO", "1")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.utils import timezone  # noqa: E402

from apps.analytics import archive, partitions  # noqa: E402
from apps.analytics.management.commands import usage_generate  # noqa: E402
from apps.analytics.services import usage_rollup_recent, usage_rollup_recompute  # noqa: E402

TENANT_SHARES = [0.40, 0.25, 0.15, 0.10, 0.10]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, *args, **kwargs):
    began = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - began, out


def ledger_count() -> int:
    with connection.cursor() as cur:
        cur.execute(f'SELECT count(*) FROM "{partitions.TABLE}"')  # noqa: S608
        return cur.fetchone()[0]


def table_bytes() -> dict:
    with connection.cursor() as cur:
        cur.execute("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)", [partitions.TABLE])
        ledger = int(cur.fetchone()[0])
        out = {"ledger": ledger}
        for name in ("analytics_usageeventrequest", "analytics_usagerolluphourly", "analytics_usagerollupdaily"):
            cur.execute("SELECT pg_total_relation_size(%s::regclass)", [name])
            out[name.removeprefix("analytics_")] = cur.fetchone()[0]
    return out


def reset() -> None:
    from apps.analytics.models import LedgerArchive

    with connection.cursor() as cur:
        cur.execute(f'TRUNCATE "{partitions.TABLE}", "{partitions.IDEMPOTENCY_TABLE}", analytics_usagerolluphourly, '
                    'analytics_usagerollupdaily, analytics_attemptrolluphourly')
    LedgerArchive.objects.all().delete()


class Setup:
    def __init__(self, months: int, seed: int):
        from django.contrib.auth import get_user_model

        from apps.keys.models import Membership

        self.rng = random.Random(seed)
        self.now = timezone.now()
        current = partitions.month_start(self.now.astimezone(UTC))
        self.first_month = partitions.month_add(current, -months)
        self.start = partitions.month_bounds(self.first_month)[0]
        month = self.first_month
        while month <= current:
            partitions.partition_ensure(month)
            month = partitions.month_add(month, 1)
        gen = usage_generate.Command()
        self.tenants = [gen._tenant(f"bench-{i}") for i in range(len(TENANT_SHARES))]
        user, _ = get_user_model().objects.get_or_create(username="bench-owner")
        Membership.objects.get_or_create(user=user, tenant=self.tenants[0][0], defaults={"role": "owner"})
        self.user = user
        self.gen = gen

    def copy(self, n: int) -> None:
        """n rows over [start, now), split among the tenants, in one COPY per tenant."""
        for (tenant, keys), share in zip(self.tenants, TENANT_SHARES, strict=True):
            self.gen._copy(self.gen._rows(self.rng, tenant, keys, self.start, self.now, round(n * share)))

    def fields(self, n: int) -> list[dict]:
        """n ledger rows as the gateway passes them to usage_event_record (timestamp now)."""
        tenant, keys = self.tenants[0]
        now = timezone.now()
        rows = self.gen._rows(self.rng, tenant, keys, now - timedelta(seconds=1), now, n)
        return [{**dict(zip(usage_generate.COLUMNS, row, strict=True)), "attempts": []} for row in rows]


# --- insert rate through the gateway's writer -------------------------------------------------

def writer_rate(setup: Setup, n: int, concurrency: int, mode: str) -> float:
    """rows/s through usage_event_record (mode "batch" or "single"), or through a COPY variant of
    the group commit ("copy"), with `concurrency` writes in flight."""
    from apps.analytics import services
    from apps.core import db

    rows = setup.fields(n)

    async def run() -> float:
        db.server_loop_mark()
        pool = await db.pg_pool()
        await pool.wait()
        services._batchers.clear()
        if mode == "copy":
            services._batchers[id(pool)] = CopyBatcher(pool)
        sem = asyncio.Semaphore(concurrency)

        async def one(fields):
            async with sem:
                await services.usage_event_record(**fields)

        began = time.perf_counter()
        await asyncio.gather(*(one(f) for f in rows))
        took = time.perf_counter() - began
        services._batchers.clear()
        await pool.close()
        db._pool = None
        return n / took

    old = settings.GATEWAY_LEDGER_WRITER
    settings.GATEWAY_LEDGER_WRITER = "single" if mode == "single" else "batch"
    try:
        return asyncio.run(run())
    finally:
        settings.GATEWAY_LEDGER_WRITER = old
        # These rows all fall in the last minutes: left there, they would pile up in the window of the
        # beat's rollup run measured at the next step (a burst no real hour has).
        ids = [r["request_id"] for r in rows]
        with connection.cursor() as cur:
            cur.execute(f'DELETE FROM "{partitions.TABLE}" WHERE "request_id" = ANY(%s)', [ids])  # noqa: S608
            cur.execute(f'DELETE FROM "{partitions.IDEMPOTENCY_TABLE}" WHERE "request_id" = ANY(%s)', [ids])  # noqa: S608


def _copy_batcher():
    from apps.analytics.models import UsageEvent
    from apps.analytics.services import _Batcher, _insert_sql

    class _CopyBatcher(_Batcher):
        """The group commit with COPY instead of INSERT ... SELECT unnest (bench only). The
        partition trigger skips a request id already there, as for the INSERT."""

        async def _insert(self, rows):
            from psycopg.types.json import Jsonb

            names = [f.column for f in UsageEvent._meta.concrete_fields if not f.primary_key]
            json_at = [i for i, (a, _d) in enumerate(_insert_sql()[1]) if a == "attempts"]
            async with self.pool.connection() as conn, conn.transaction():
                cur = conn.cursor()
                async with cur.copy(f'COPY "{UsageEvent._meta.db_table}" ({", ".join(names)}) FROM STDIN') as cp:
                    for row in rows:
                        row = list(row)
                        for i in json_at:
                            row[i] = Jsonb(row[i])
                        await cp.write_row(row)

    return _CopyBatcher


CopyBatcher = None


# --- pages and exports ------------------------------------------------------------------------

def median_ms(client: Client, url: str, repeat: int) -> float:
    times = []
    for i in range(repeat + 1):
        began = time.perf_counter()
        response = client.get(url)
        if response.status_code != 200:
            raise SystemExit(f"{url}: {response.status_code} {response.content[:300]!r}")
        if response.streaming:
            for _chunk in response.streaming_content:
                pass
        if i:  # the first run warms caches and connections
            times.append((time.perf_counter() - began) * 1000)
    return round(statistics.median(times), 1)


def page_latencies(setup: Setup, repeat: int) -> dict:
    if "testserver" not in settings.ALLOWED_HOSTS:
        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    client = Client()
    client.force_login(setup.user)
    today = timezone.now().date()
    d7, d30 = today - timedelta(days=6), today - timedelta(days=29)
    out = {
        "dashboard_7d_ms": median_ms(client, f"/dashboard/?tenant=bench-0&since={d7}&until={today}", repeat),
        "dashboard_30d_ms": median_ms(client, f"/dashboard/?tenant=bench-0&since={d30}&until={today}", repeat),
        "api_analytics_30d_ms": median_ms(client, f"/api/analytics/dashboard/?tenant=bench-0&since={d30}&until={today}",
                                          repeat),
        "api_usage_events_first_page_ms": median_ms(client, f"/api/usage-events/?tenant=bench-0&since={d30}"
                                                            f"&until={today}&limit=100", repeat),
    }
    out["batches_30d_ms"] = median_ms(client, f"/dashboard/batches/?tenant=bench-0&since={d30}&until={today}", repeat)
    url = f"/api/usage-events/?tenant=bench-0&since={d30}&until={today}&limit=100"
    for _ in range(5):  # (fewer when the range has fewer pages)
        url = (client.get(url).json()["next"] or url).removeprefix("http://testserver")
    out["api_usage_events_page_6_ms"] = median_ms(client, url, repeat)
    return out


class _Count:
    def __init__(self):
        self.bytes = 0

    def write(self, s):
        self.bytes += len(s)

    def flush(self):
        pass


def export_rates(setup: Setup) -> dict:
    """The biggest tenant's last whole month, as CSV: the command and the dashboard endpoint."""
    from apps.analytics.models import UsageEvent

    month = partitions.month_add(partitions.month_start(setup.now.astimezone(UTC)), -1)
    start, end = partitions.month_bounds(month)
    tenant = setup.tenants[0][0]
    rows = UsageEvent.objects.filter(tenant=tenant, timestamp__gte=start, timestamp__lt=end).count()
    sink = _Count()
    took, _ = timed(call_command, "usage_export", tenant=tenant.slug, format="csv", since=start.isoformat(),
                    until=end.isoformat(), stdout=sink)
    out = {"export_rows": rows, "usage_export_csv_s": round(took, 2), "usage_export_csv_rows_s": round(rows / took),
           "usage_export_csv_bytes": sink.bytes}
    client = Client()
    client.force_login(setup.user)
    last_day = (end - timedelta(days=1)).date()
    began = time.perf_counter()
    response = client.get(f"/dashboard/usage.csv?tenant={tenant.slug}&since={start.date()}&until={last_day}")
    size = sum(len(c) for c in response.streaming_content)
    took = time.perf_counter() - began
    out.update(dashboard_csv_s=round(took, 2), dashboard_csv_rows_s=round(rows / took), dashboard_csv_bytes=size)
    return out


def archive_cycle(setup: Setup, fmt: str | None = None) -> dict:
    """Archive + drop of the oldest month (every tenant: the partition goes whole), then restore."""
    from apps.analytics.models import LedgerArchive, UsageEvent

    if fmt:
        settings.LEDGER_ARCHIVE_FORMAT = fmt
    month = setup.first_month
    LedgerArchive.objects.filter(month=month).delete()  # an earlier cycle's records (another store)
    start, end = partitions.month_bounds(month)
    rows = UsageEvent.objects.filter(timestamp__gte=start, timestamp__lt=end).count()
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as tmp:
        store = archive.archive_store(tmp)
        tenants = sorted(archive.month_tenants(month))
        took_a, _ = timed(lambda: [archive.ledger_archive_month(tenant_id=t, month=month, store=store)
                                   for t in tenants])
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        took_d, dropped = timed(archive.ledger_drop_month, month=month, store=store)
        assert dropped["partition_dropped"], dropped
        took_r, _ = timed(archive.ledger_restore_month, month=month, store=store)
        assert UsageEvent.objects.filter(timestamp__gte=start, timestamp__lt=end).count() == rows
    return {"archive_month_rows": rows, "archive_s": round(took_a, 1), "archive_rows_s": round(rows / took_a),
            "archive_bytes": size, "drop_s": round(took_d, 2), "restore_s": round(took_r, 1),
            "restore_rows_s": round(rows / took_r), "format": archive.archive_format()}


def slope(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of y over x."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if not den:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den
    return my - b * mx, b


def main() -> None:
    global CopyBatcher
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,2000000,4000000", help="ledger sizes to measure at (rows)")
    p.add_argument("--months", type=int, default=4, help="whole past UTC months (plus the current one)")
    p.add_argument("--minutes", type=float, default=25, help="stop growing when the next step would not fit")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--writer-rows", type=int, default=20000)
    p.add_argument("--writer-concurrency", type=int, default=256)
    p.add_argument("--archive-at", default="first,last", help="steps at which to archive/drop/restore a month")
    p.add_argument("--extrapolate", type=int, default=50_000_000)
    p.add_argument("--keep", action="store_true", help="grow the ledger there instead of starting empty")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "var" / "ledger-scale.json"))
    p.add_argument("--existing", action="store_true",
                   help="no growing: on the ledger there, the beat's rollup run (median of --repeat) and an "
                        "archive/drop/restore cycle per --formats")
    p.add_argument("--formats", default="csv,parquet")
    args = p.parse_args()
    if connection.vendor != "postgresql" or not settings.DATABASES["default"]["NAME"].endswith("_bench"):
        raise SystemExit("PostgreSQL only, on a database whose name ends in _bench (it is truncated)")
    if not partitions.is_partitioned():
        raise SystemExit("the ledger is not partitioned: run migrate")
    CopyBatcher = _copy_batcher()
    (ROOT / "var").mkdir(exist_ok=True)
    if args.existing:
        setup = Setup(args.months, args.seed)
        out = {"rows": ledger_count(), "load_before": load(), "rollup_recent_s": []}
        for _ in range(args.repeat):
            out["rollup_recent_s"].append(round(timed(usage_rollup_recent)[0], 3))
        out["rollup_recent_median_s"] = statistics.median(out["rollup_recent_s"])
        out.update(page_latencies(setup, args.repeat))
        print(json.dumps(out), flush=True)
        for fmt in args.formats.split(","):
            out[fmt] = archive_cycle(setup, fmt)
            print(json.dumps(out[fmt]), flush=True)
        out["load_after"] = load()
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    deadline = time.monotonic() + args.minutes * 60
    if not args.keep:
        reset()
    setup = Setup(args.months, args.seed)
    with connection.cursor() as cur:
        cur.execute("SHOW server_version")
        pg = cur.fetchone()[0]
    report = {"started": timezone.now().isoformat(), "cpus": os.cpu_count(), "postgres": pg,
              "months": args.months + 1, "tenants": len(TENANT_SHARES), "steps": []}
    print(f"PostgreSQL {pg}, {os.cpu_count()} CPUs, load {load()}", flush=True)
    # Python's row generator alone (how much of the COPY rate is this process)
    gen_n = 50_000
    tenant, keys = setup.tenants[0]
    took, _ = timed(lambda: sum(1 for _ in setup.gen._rows(random.Random(1), tenant, keys, setup.start, setup.now,
                                                           gen_n)))
    report["generator_rows_s"] = round(gen_n / took)
    archive_at = set(args.archive_at.split(","))
    step_started = time.monotonic()
    for i, size in enumerate(sizes):
        have = ledger_count()
        if size <= have:
            continue
        if i and time.monotonic() + (time.monotonic() - step_started) * (size - have) / max(have, 1) * 1.1 > deadline:
            print(f"stopping before {size:,} rows: it would not fit in --minutes", flush=True)
            break
        step_started = time.monotonic()
        step = {"rows_before": have, "load_before": load()}
        took, _ = timed(setup.copy, size - have)
        step["copy_rows"], step["copy_s"] = size - have, round(took, 1)
        step["copy_rows_s"] = round((size - have) / took)
        with connection.cursor() as cur:
            cur.execute(f'ANALYZE "{partitions.TABLE}"')  # noqa: S608 - as autovacuum would, soon after
        took, counts = timed(usage_rollup_recompute, since=setup.start, until=setup.now + timedelta(seconds=1))
        step["rollup_full_s"], step["rollup_rows"] = round(took, 1), counts
        step["rows"] = ledger_count()
        took, _ = timed(usage_rollup_recent)
        step["rollup_recent_s"] = round(took, 2)
        step["writer_batch_rows_s"] = round(writer_rate(setup, args.writer_rows, args.writer_concurrency, "batch"))
        step["writer_copy_rows_s"] = round(writer_rate(setup, args.writer_rows, args.writer_concurrency, "copy"))
        step["writer_single_rows_s"] = round(writer_rate(setup, args.writer_rows // 4, args.writer_concurrency,
                                                         "single"))
        step.update(page_latencies(setup, args.repeat))
        step.update(export_rates(setup))
        last = i == len(sizes) - 1 or (i + 1 < len(sizes) and time.monotonic() + (time.monotonic() - step_started)
                                        * (sizes[i + 1] - size) / size > deadline)
        if ("first" in archive_at and not report["steps"]) or ("last" in archive_at and last):
            step.update(archive_cycle(setup))
        step["bytes"] = table_bytes()
        step["load_after"] = load()
        step["step_s"] = round(time.monotonic() - step_started)
        report["steps"].append(step)
        print(json.dumps(step, default=str), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    # Linear fits of what grows with the size (latencies, seconds, bytes). Rates are not fitted: per
    # row they do not depend on the size, and on a shared machine their trend is the load's.
    fits = {}
    for step in report["steps"]:
        step.update({f"bytes_{k}": v for k, v in step["bytes"].items()})
    for key in ("rollup_full_s", "rollup_recent_s", "dashboard_7d_ms", "dashboard_30d_ms", "api_analytics_30d_ms",
                "api_usage_events_first_page_ms", "api_usage_events_page_6_ms", "batches_30d_ms",
                "bytes_ledger", "bytes_usageeventrequest", "bytes_usagerolluphourly", "bytes_usagerollupdaily"):
        fit = slope([(s["rows"], s[key]) for s in report["steps"] if key in s])
        if fit:
            a, b = fit
            fits[key] = {"intercept": round(a, 3), "per_million_rows": round(b * 1e6, 4),
                         f"at_{args.extrapolate}": round(a + b * args.extrapolate, 1)}
    report["fits"] = fits
    report["finished"] = timezone.now().isoformat()
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(fits, indent=2), flush=True)


if __name__ == "__main__":
    main()
