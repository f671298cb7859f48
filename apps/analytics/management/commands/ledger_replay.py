"""`python manage.py ledger_replay`: replay the ledger journal (rows journaled while the database
was unavailable) into the ledger, idempotently. Safe alongside running gateways and workers."""

from django.core.management.base import BaseCommand, CommandError

from apps.analytics.journal import DB_UNAVAILABLE, journal_dir, ledger_replay


class Command(BaseCommand):
    help = "Replay the local ledger journal (LEDGER_JOURNAL_DIR) into the ledger."

    def add_arguments(self, parser):
        parser.add_argument("--dir", help="journal directory (default: LEDGER_JOURNAL_DIR)")
        parser.add_argument("--no-rollups", action="store_true", help="do not recompute the rollups")

    def handle(self, *args, **opts):
        from pathlib import Path

        directory = Path(opts["dir"]) if opts["dir"] else journal_dir()
        total = {"segments": 0, "rows": 0, "rejected": 0, "left": 0}
        try:
            for _ in range(1000):  # bounded: rows journaled meanwhile are for the next run
                result = ledger_replay(directory=directory, rollups=not opts["no_rollups"])
                for k in ("segments", "rows", "rejected"):
                    total[k] += result[k]
                total["left"] = result["left"]
                if not result["segments"]:  # nothing (more) this process could claim
                    break
        except DB_UNAVAILABLE as exc:
            raise CommandError(f"the database is unavailable, the journal is kept: {exc}") from exc
        self.stdout.write(f"replayed {total['rows']} row(s) from {total['segments']} segment(s) in {directory}; "
                          f"rejected {total['rejected']}; segments left (held by another process) {total['left']}")
