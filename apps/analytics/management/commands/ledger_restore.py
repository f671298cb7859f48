"""`python manage.py ledger_restore --month YYYY-MM [--tenant SLUG]`: put an archived month back into
the ledger (checksums checked; rows keep their ids; rows still there are skipped), and check the
totals equal the archive's manifest."""

from django.core.management.base import BaseCommand, CommandError

from apps.analytics import archive, partitions

from .ledger_archive import _tenant_ids


class Command(BaseCommand):
    help = "Restore one archived UTC month of the ledger (every archived tenant, or one)."

    def add_arguments(self, parser):
        parser.add_argument("--month", required=True, help="YYYY-MM (UTC)")
        parser.add_argument("--tenant", help="only this tenant (slug)")
        parser.add_argument("--from", dest="source", help="archive URL (default: LEDGER_ARCHIVE_URL)")

    def handle(self, *args, **opts):
        try:
            month = partitions.parse_month(opts["month"])
            result = archive.ledger_restore_month(month=month, tenant_ids=_tenant_ids(opts["tenant"]),
                                                  store=archive.archive_store(opts["source"]))
        except (ValueError, archive.ArchiveError) as exc:
            raise CommandError(str(exc)) from exc
        for tenant_id, totals in result["tenants"].items():
            self.stdout.write(f"{result['month']} tenant {tenant_id}: {totals['rows']} rows, cost {totals['cost']}, "
                              f"tokens {totals['prompt_tokens']}+{totals['completion_tokens']} (match the archive)")
