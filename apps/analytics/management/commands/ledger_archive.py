"""`python manage.py ledger_archive --month YYYY-MM [--tenant SLUG] [--drop]`: archive a month of the
ledger (compressed CSV, manifest with checksums) to LEDGER_ARCHIVE_URL; with --drop, then drop those
rows from the database (the whole partition when every tenant goes). See apps/analytics/archive.py."""

from django.core.management.base import BaseCommand, CommandError

from apps.analytics import archive, partitions


class Command(BaseCommand):
    help = "Archive one UTC month of the ledger (every tenant, or one) and optionally drop it."

    def add_arguments(self, parser):
        parser.add_argument("--month", required=True, help="YYYY-MM (UTC)")
        parser.add_argument("--tenant", help="only this tenant (slug)")
        parser.add_argument("--drop", action="store_true", help="drop the archived rows from the database")
        parser.add_argument("--to", help="archive URL (default: LEDGER_ARCHIVE_URL)")

    def handle(self, *args, **opts):
        try:
            month = partitions.parse_month(opts["month"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        tenant_ids = _tenant_ids(opts["tenant"])
        store = archive.archive_store(opts["to"])
        try:
            if opts["drop"]:
                result = archive.ledger_archive_and_drop(month=month, tenant_ids=tenant_ids, store=store)
                self.stdout.write(f"{result['month']}: archived and dropped tenants {result['tenants']}"
                                  f"{' (whole partition)' if result['partition_dropped'] else ''}")
                return
            targets = archive.month_tenants(month)
            if tenant_ids is not None:
                targets &= tenant_ids
            for tenant_id in sorted(targets):
                a = archive.ledger_archive_month(tenant_id=tenant_id, month=month, store=store)
                self.stdout.write(f"{month:%Y-%m} tenant {tenant_id}: {a.rows} rows, cost {a.cost} -> {a.location}")
            if not targets:
                self.stdout.write(f"{month:%Y-%m}: no rows to archive")
        except archive.ArchiveError as exc:
            raise CommandError(str(exc)) from exc


def _tenant_ids(slug):
    if not slug:
        return None
    from apps.keys.models import Tenant

    tenant = Tenant.objects.filter(slug=slug).first()
    if tenant is None:
        raise CommandError(f"--tenant {slug}: no such tenant")
    return {tenant.id}
