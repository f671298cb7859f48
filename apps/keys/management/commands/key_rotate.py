from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.keys.services import api_key_rotate, cli_actor

from ._keyarg import add_key_arguments, key_from_options


class Command(BaseCommand):
    help = ("Give an API key a new secret and print it, alone, on stdout (shown only this once). "
            "The old secret keeps working for --grace-seconds (default 0: refused at once).")

    def add_arguments(self, parser):
        add_key_arguments(parser)
        parser.add_argument("--grace-seconds", type=int, default=0,
                            help="how long the old secret keeps working (default 0)")

    def handle(self, *args, **o):
        if o["grace_seconds"] < 0:
            raise CommandError("--grace-seconds: must be zero or more")
        key = key_from_options(o)
        try:
            created = api_key_rotate(key=key, actor=cli_actor(), grace_s=o["grace_seconds"], via="cli")
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages))
        self.stdout.write(created.secret)
