from datetime import timedelta

from django.core.management.base import BaseCommand
from django.utils import timezone

from apps.analytics.management.commands.usage_export import _when
from apps.analytics.services import usage_rollup_recompute


class Command(BaseCommand):
    help = "Recompute hourly and daily usage rollups from the ledger (idempotent). Default: the last 3 hours."

    def add_arguments(self, parser):
        parser.add_argument("--since", help="ISO date or datetime; naive means UTC")
        parser.add_argument("--until", help="ISO date or datetime (exclusive); default now")

    def handle(self, *args, since, until, **opts):
        until_at = _when("until", until) or timezone.now() + timedelta(seconds=1)
        since_at = _when("since", since) or until_at - timedelta(hours=3)
        started = timezone.now()
        counts = usage_rollup_recompute(since=since_at, until=until_at)
        took = (timezone.now() - started).total_seconds()
        self.stdout.write(f"rollups rebuilt {since_at.isoformat()} .. {until_at.isoformat()}: "
                          f"{counts['hourly']} hourly, {counts['daily']} daily rows in {took:.1f} s")
