"""A realistic synthetic ledger for load and dashboard measurements (never for real tenants)."""

import random
import time
import uuid
from datetime import UTC, timedelta
from decimal import Decimal

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone

from apps.analytics import partitions
from apps.analytics.models import UsageEvent
from apps.analytics.services import usage_rollup_recompute
from apps.billing.models import Budget
from apps.keys import crypto
from apps.keys.models import ApiKey, Source, Tenant

# alias, provider, input $/Mtok, output $/Mtok, share of traffic
MODELS = [
    ("gpt-4o-mini", "openai", Decimal("0.15"), Decimal("0.60"), 0.45),
    ("gpt-4o", "openai", Decimal("2.50"), Decimal("10.00"), 0.15),
    ("claude-3-5-haiku", "anthropic", Decimal("0.80"), Decimal("4.00"), 0.2),
    ("gemini-1.5-flash", "gemini", Decimal("0.075"), Decimal("0.30"), 0.15),
    ("text-embedding-3-small", "openai", Decimal("0.02"), Decimal("0"), 0.05),
]
SOURCES = [("support-bot", "application"), ("search", "application"), ("sales-assistant", "application"),
           ("docs-qa", "application"), ("nightly-etl", "service"), ("classifier", "service"),
           ("summariser", "service"), ("translation", "service")]
BUDGET_IDS = ["", "", "", "campaign-q4", "research", "eu-launch"]
COLUMNS = ["request_id", "timestamp", "tenant_id", "api_key_id", "source_id", "source_type", "source_ref",
           "request_type", "model", "provider", "upstream_model", "prompt_tokens", "completion_tokens",
           "cached_tokens", "cache_write_tokens", "reasoning_tokens", "cost", "saved_cost", "status", "error_code",
           "latency_ms", "cached", "stream", "is_async", "batch_id", "budget_id", "priority", "estimated",
           "prompt_hash"]
MTOK = Decimal(1_000_000)
Q = Decimal("0.0000000001")


class Command(BaseCommand):
    help = "Generate a realistic synthetic ledger (default 1,000,000 events over 30 days) and its rollups."

    def add_arguments(self, parser):
        parser.add_argument("--events", type=int, default=1_000_000)
        parser.add_argument("--days", type=int, default=30)
        parser.add_argument("--tenant", default="loadtest")
        parser.add_argument("--seed", type=int, default=7)
        parser.add_argument("--no-rollup", action="store_true")

    def handle(self, *args, events, days, tenant, seed, no_rollup, **opts):
        if events <= 0 or days <= 0:
            raise CommandError("--events and --days must be positive")
        rng = random.Random(seed)
        t, keys = self._tenant(tenant)
        now = timezone.now()
        start = now - timedelta(days=days)
        began = time.perf_counter()
        rows = self._rows(rng, t, keys, start, now, events)
        if connection.vendor == "postgresql":
            if partitions.is_partitioned():  # each month's rows straight into its own partition
                month = partitions.month_start(start.astimezone(UTC))
                while partitions.month_bounds(month)[0] <= now:
                    partitions.partition_ensure(month)
                    month = partitions.month_add(month, 1)
            self._copy(rows)
        else:
            self._bulk(rows)
        inserted = time.perf_counter() - began
        self.stdout.write(f"inserted {events} events in {inserted:.1f} s ({events / inserted:,.0f}/s)")
        if not no_rollup:
            began = time.perf_counter()
            counts = usage_rollup_recompute(since=start, until=now + timedelta(seconds=1))
            self.stdout.write(f"rollups: {counts['hourly']} hourly, {counts['daily']} daily rows in "
                              f"{time.perf_counter() - began:.1f} s")

    @transaction.atomic
    def _tenant(self, slug):
        t, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": f"{slug} (synthetic)"})
        keys = []
        for name, kind in SOURCES:
            source, _ = Source.objects.get_or_create(tenant=t, name=name, defaults={"type": kind})
            for i in range(3):
                key = ApiKey.objects.filter(tenant=t, name=f"{name}-{i}").first()
                if key is None:
                    secret = crypto.api_key_generate()
                    key = ApiKey.objects.create(tenant=t, source=source, name=f"{name}-{i}",
                                                digest=crypto.api_key_digest(secret),
                                                prefix=crypto.api_key_display_prefix(secret))
                keys.append((key.id, source.id, name, kind))
        Budget.objects.get_or_create(tenant=t, name=f"{slug}-monthly",
                                     defaults={"limit_usd": Decimal("5000"), "period": "monthly"})
        Budget.objects.get_or_create(tenant=t, name=f"{slug}-etl-daily",
                                     defaults={"limit_usd": Decimal("50"), "period": "daily", "scope": "source",
                                               "scope_value": "nightly-etl"})
        return t, keys

    def _rows(self, rng, tenant, keys, start, end, n):
        span = (end - start).total_seconds()
        weights = [m[4] for m in MODELS]
        key_weights = [1 / (i + 1) for i in range(len(keys))]  # a few busy keys, a long tail
        for _ in range(n):
            # more traffic in working hours: rejection-sample the hour of day
            while True:
                at = start + timedelta(seconds=rng.random() * span)
                if rng.random() < (1.0 if 8 <= at.hour < 19 else 0.35):
                    break
            alias, provider, p_in, p_out, _share = rng.choices(MODELS, weights)[0]
            key_id, source_id, source_name, source_type = rng.choices(keys, key_weights)[0]
            embedding = alias.startswith("text-embedding")
            prompt = int(rng.lognormvariate(6.0, 1.0)) + 5
            completion = 0 if embedding else int(rng.lognormvariate(5.0, 0.9)) + 1
            r = rng.random()
            status, error = (200, "") if r < 0.965 else (429, "rate_limit_exceeded") if r < 0.985 else \
                (502, "upstream_error") if r < 0.997 else (400, "invalid_request_error")
            cached = status == 200 and not embedding and rng.random() < 0.08
            full = ((prompt * p_in + completion * p_out) / MTOK).quantize(Q)
            cost = Decimal(0) if cached or status != 200 else full
            latency = int(rng.uniform(2, 15)) if cached else int(rng.lognormvariate(6.3, 0.6))
            yield (
                "req_" + uuid.uuid4().hex, at, tenant.id, key_id, source_id, source_type,
                source_name, "embeddings" if embedding else "chat", alias, provider, alias, prompt,
                completion if status == 200 else 0, 0, 0, 0, cost, full if cached else Decimal(0), status, error,
                latency, cached, rng.random() < 0.3, False, "", rng.choice(BUDGET_IDS), 0, False,
                "" if cached else f"{rng.randrange(max(1, n // 4)):016x}",  # a prompt sent ~4 times
            )

    def _copy(self, rows):
        table = UsageEvent._meta.db_table
        with connection.cursor() as cur:
            raw = cur.cursor  # psycopg 3
            with raw.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    def _bulk(self, rows, batch=5000):
        buf = []
        for row in rows:
            buf.append(UsageEvent(**dict(zip(COLUMNS, row, strict=True))))
            if len(buf) >= batch:
                UsageEvent.objects.bulk_create(buf)
                buf.clear()
        if buf:
            UsageEvent.objects.bulk_create(buf)
