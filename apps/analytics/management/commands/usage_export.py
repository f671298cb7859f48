import orjson
from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime

from apps.analytics.csv_safe import SafeCsvWriter
from apps.analytics.selectors import (
    CSV_COLUMNS,
    CSV_NUMERIC_COLUMNS,
    csv_row,
    seed_usage_event,
    usage_events,
    usage_export_rows,
)
from apps.keys.models import Tenant


def _when(flag: str, value: str | None):
    if value is None:
        return None
    parsed = parse_datetime(value)
    if parsed is None:
        from django.utils.dateparse import parse_date

        day = parse_date(value)
        if day is None:
            raise CommandError(f"--{flag}: not an ISO date or datetime: {value!r}")
        from datetime import datetime, time

        parsed = datetime.combine(day, time.min)
    if parsed.tzinfo is None:
        from datetime import UTC

        parsed = parsed.replace(tzinfo=UTC)
    return parsed


class Command(BaseCommand):
    help = "Export a tenant's ledger in the seed's usage-event shape (JSON lines) or as CSV."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True)
        parser.add_argument("--format", choices=["csv", "json"], default="json")
        parser.add_argument("--since", help="ISO date or datetime (inclusive); naive means UTC")
        parser.add_argument("--until", help="ISO date or datetime (exclusive); naive means UTC")

    def handle(self, *args, tenant, format, since, until, **opts):  # noqa: A002
        t = Tenant.objects.filter(slug=tenant).first()
        if t is None:
            raise CommandError(f"--tenant: no tenant with slug {tenant!r}")
        rows = usage_export_rows(usage_events(tenant_ids=[t.id], since=_when("since", since),
                                              until=_when("until", until)))
        if format == "csv":
            # CRLF line ends (RFC 4180, as the web exports): with "\n" the csv module would leave a
            # cell holding a lone CR unquoted, and a reader would split the row there.
            writer = SafeCsvWriter(self.stdout, columns=CSV_COLUMNS, numeric_columns=CSV_NUMERIC_COLUMNS)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                writer.writerow(csv_row(row))
        else:
            for row in rows:
                self.stdout.write(orjson.dumps(seed_usage_event(row)).decode())
