"""Time the dashboard, the analytics API and the CSV exports on a tenant's ledger (usage_generate)."""

import resource
import statistics
import time
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.test import Client
from django.utils import timezone

from apps.keys.models import Membership, Tenant


class Command(BaseCommand):
    help = "Measure dashboard, analytics API and CSV export times for one tenant (run usage_generate first)."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", default="loadtest")
        parser.add_argument("--repeat", type=int, default=5)
        parser.add_argument("--days", type=int, default=30)

    def handle(self, *args, tenant, repeat, days, **opts):
        t = Tenant.objects.filter(slug=tenant).first()
        if t is None:
            raise CommandError(f"no tenant {tenant!r}: run `manage.py usage_generate --tenant {tenant}` first")
        user, _ = get_user_model().objects.get_or_create(username=f"{tenant}-bench-manager",
                                                         defaults={"is_staff": True})
        Membership.objects.get_or_create(user=user, tenant=t, defaults={"role": "manager"})
        client = Client()
        client.force_login(user)
        today = timezone.now().date()
        ranges = {
            "today (hourly)": {"since": today, "until": today},
            "7 days (daily)": {"since": today - timedelta(days=6), "until": today},
            f"{days} days (daily)": {"since": today - timedelta(days=days), "until": today},
            f"{days} days, one model": {"since": today - timedelta(days=days), "until": today,
                                        "model": "gpt-4o-mini"},
            f"{days} days, hourly": {"since": today - timedelta(days=days), "until": today, "granularity": "hour"},
        }
        for label, params in ranges.items():
            for url in ("/dashboard/", "/api/analytics/dashboard/"):
                self._time(client, url, params, repeat, label)
        full = {"since": today - timedelta(days=days), "until": today}
        self._time(client, "/dashboard/usage-summary.csv", {**full, "group": "day_model"}, repeat, "aggregate csv")
        self._csv(client, full)

    def _time(self, client, url, params, repeat, label):
        samples = []
        for _ in range(repeat + 1):
            began = time.perf_counter()
            resp = client.get(url, params)
            body = b"".join(resp.streaming_content) if resp.streaming else resp.content
            samples.append((time.perf_counter() - began) * 1000)
            if resp.status_code != 200:
                raise CommandError(f"{url} answered {resp.status_code}: {body[:300]!r}")
        samples = samples[1:]  # the first run warms caches
        self.stdout.write(f"{url:32} {label:26} median {statistics.median(samples):7.1f} ms   "
                          f"max {max(samples):7.1f} ms")

    def _csv(self, client, params):
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        began = time.perf_counter()
        resp = client.get("/dashboard/usage.csv", params)
        rows = size = 0
        for chunk in resp.streaming_content:
            size += len(chunk)
            rows += chunk.count(b"\n")
        took = time.perf_counter() - began
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.stdout.write(f"/dashboard/usage.csv  {rows - 1:,} rows, {size / 1e6:.0f} MB in {took:.1f} s "
                          f"({(rows - 1) / took:,.0f} rows/s); peak RSS grew {(rss_after - rss_before) / 1024:.0f} MB")
