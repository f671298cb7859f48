from django.core.management.base import BaseCommand, CommandError

from apps.gateway.services import model_rollout
from apps.gateway.versions import RolloutError
from apps.keys.services import cli_actor


def shares_text(alias: str, shares: dict[str, int]) -> str:
    return "\n".join(f"{alias}@{version}\t{share}%" for version, share in sorted(shares.items()))


class Command(BaseCommand):
    help = ("Give a version of a model alias a share (percent) of the bare alias's traffic; the other versions "
            "divide the rest. Audited; every gateway instance follows within GATEWAY_ROUTES_CACHE_TTL_S.")

    def add_arguments(self, parser):
        parser.add_argument("alias")
        parser.add_argument("version", help="the deployment's version label, else its upstream model")
        parser.add_argument("--share", type=int, required=True, help="percent of the traffic, 0 to 100")

    def handle(self, *args, alias, version, share, **opts):
        try:
            shares = model_rollout(alias=alias, version=version, share=share, actor=cli_actor())
        except RolloutError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(shares_text(alias, shares))
