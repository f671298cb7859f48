from django.core.management.base import BaseCommand

from apps.keys.services import api_key_revoke, cli_actor

from ._keyarg import add_key_arguments, key_from_options


class Command(BaseCommand):
    help = "Revoke an API key: every gateway instance refuses it within GATEWAY_AUTH_CACHE_TTL_S."

    def add_arguments(self, parser):
        add_key_arguments(parser)

    def handle(self, *args, **o):
        key = key_from_options(o)
        already = key.revoked_at is not None
        api_key_revoke(key=key, actor=cli_actor(), via="cli")
        self.stderr.write(f"{key.tenant.slug}/{key.name} ({key.prefix}...) "
                          f"{'was already revoked' if already else 'revoked'}")
