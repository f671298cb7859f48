"""Shared: find one API key from --tenant and --name or --prefix."""

from django.core.management.base import CommandError

from apps.keys.models import ApiKey, Tenant


def add_key_arguments(parser) -> None:
    parser.add_argument("--tenant", required=True, help="tenant slug")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", help="the key's name")
    which.add_argument("--prefix", help="the key's display prefix (as the admin shows it)")


def key_from_options(o: dict) -> ApiKey:
    tenant = Tenant.objects.filter(slug=o["tenant"]).first()
    if tenant is None:
        raise CommandError(f"--tenant: no tenant with slug {o['tenant']!r}")
    if o.get("name"):
        key = tenant.api_keys.filter(name=o["name"]).first()
        if key is None:
            raise CommandError(f"--name: tenant {tenant.slug} has no key named {o['name']!r}")
        return key
    keys = list(tenant.api_keys.filter(prefix=o["prefix"])[:2])
    if len(keys) != 1:
        raise CommandError(f"--prefix: {'no key' if not keys else 'more than one key'} with prefix {o['prefix']!r}")
    return keys[0]
