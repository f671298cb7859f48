from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.keys.models import Role, Tenant
from apps.keys.services import cli_actor, management_token_create


class Command(BaseCommand):
    help = ("Create a management API token (/api/) and print it, alone, on stdout (shown only this once). "
            "Use it as `Authorization: Bearer <token>`.")

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="tenant slug")
        parser.add_argument("--name", required=True, help="token name, unique in the tenant")
        parser.add_argument("--role", choices=Role.values, default=Role.VIEWER, help="default: viewer")
        who = parser.add_mutually_exclusive_group(required=True)
        who.add_argument("--user", help="a personal token of this user (never above the user's own role)")
        who.add_argument("--service", action="store_true", help="a service token (its own service identity)")
        parser.add_argument("--expires-days", type=int, default=90, help="default: 90 (at most 365)")

    def handle(self, *args, **o):
        tenant = Tenant.objects.filter(slug=o["tenant"]).first()
        if tenant is None:
            raise CommandError(f"--tenant: no tenant with slug {o['tenant']!r}")
        user = None
        if o["user"]:
            user = get_user_model().objects.filter(username=o["user"]).first()
            if user is None:
                raise CommandError(f"--user: no user {o['user']!r}")
        try:
            created = management_token_create(tenant=tenant, name=o["name"], role=o["role"], actor=cli_actor(),
                                              expires_days=o["expires_days"], user=user, service=o["service"],
                                              via="cli")
        except ValidationError as exc:
            raise CommandError("; ".join(f"--{k.replace('_', '-')}: {' '.join(v)}"
                                         for k, v in exc.message_dict.items())) from None
        self.stdout.write(created.secret)
