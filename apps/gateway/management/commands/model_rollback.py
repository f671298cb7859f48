from django.core.management.base import BaseCommand, CommandError

from apps.gateway.services import model_rollback
from apps.gateway.versions import RolloutError
from apps.keys.services import cli_actor

from .model_rollout import shares_text


class Command(BaseCommand):
    help = ("End a model alias's rollout: the shares it had before the rollout began come back (a new version "
            "gets no traffic). Audited.")

    def add_arguments(self, parser):
        parser.add_argument("alias")

    def handle(self, *args, alias, **opts):
        try:
            shares = model_rollback(alias=alias, actor=cli_actor())
        except RolloutError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(shares_text(alias, shares))
