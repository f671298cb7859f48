from django.core.management.base import BaseCommand

from apps.gateway.services import prices_sync
from apps.keys.services import cli_actor


class Command(BaseCommand):
    help = ("Seed and refresh model prices from the installed genai-prices package (offline). Idempotent: "
            "a new price version only when a price changed; config and admin overrides are kept.")

    def handle(self, *args, **opts):
        results = prices_sync(actor=cli_actor())
        for alias, outcome in results.items():
            self.stdout.write(f"{alias}: {outcome}")
        created = sum(1 for o in results.values() if o == "created")
        self.stdout.write(self.style.SUCCESS(f"prices_sync: {created} new price versions, {len(results)} aliases"))
