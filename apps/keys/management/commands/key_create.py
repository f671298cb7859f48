from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.keys.models import Source, Tenant
from apps.keys.services import api_key_create, cli_actor, tenant_check_adoptable


class Command(BaseCommand):
    help = "Create an API key and print its secret, alone, on stdout (it is shown only this once)."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="tenant slug")
        parser.add_argument("--adopt", action="store_true",
                            help="accept a tenant renamed to this slug since its creation (refused without it)")
        parser.add_argument("--source", help="source name within the tenant the key books on; without it, a "
                                             "tenant-wide key (it may name any declared source in metadata)")
        parser.add_argument("--name", help="key name (default: <source or tenant>-<n>)")
        parser.add_argument("--models", help="comma-separated model aliases this key may use (default: all)")
        parser.add_argument("--rpm", type=int)
        parser.add_argument("--tpm", type=int)
        parser.add_argument("--expires-days", type=int)
        parser.add_argument("--endpoints", help="comma-separated /v1 paths this key may call, `*` allowed at the "
                                                "end (default: all)")
        parser.add_argument("--budget-id", default="", help="metadata.budget_id used when a request names none")
        parser.add_argument("--budget-id-binding", action="store_true",
                            help="the key books on --budget-id only: a request naming another is refused (403)")
        parser.add_argument("--cache", choices=["on", "off", "tenant"], default="tenant",
                            help="response cache default for this key (default: the tenant's)")
        parser.add_argument("--cache-ttl", type=int, help="cache TTL in seconds (default: the tenant's)")

    def handle(self, *args, **o):
        tenant = Tenant.objects.filter(slug=o["tenant"]).first()
        if tenant is None:
            raise CommandError(f"--tenant: no tenant with slug {o['tenant']!r}")
        try:
            tenant_check_adoptable(tenant=tenant, actor=cli_actor(), adopt=o["adopt"])
        except ValidationError as exc:
            raise CommandError("--tenant: " + " ".join(exc.messages))
        source = Source.objects.filter(tenant=tenant, name=o["source"]).first() if o["source"] else None
        if o["source"] and source is None:
            raise CommandError(f"--source: tenant {tenant.slug} has no source {o['source']!r}")
        if o["budget_id_binding"] and not o["budget_id"]:
            raise CommandError("--budget-id-binding: needs --budget-id")
        for flag in ("rpm", "tpm", "expires_days", "cache_ttl"):
            if o[flag] is not None and o[flag] < 1:
                raise CommandError(f"--{flag.replace('_', '-')}: must be a positive number")
        name = o["name"] or f"{source.name if source else tenant.slug}-{tenant.api_keys.count() + 1}"
        if tenant.api_keys.filter(name=name).exists():
            raise CommandError(f"--name: tenant {tenant.slug} already has a key named {name!r}")
        models = [m.strip() for m in (o["models"] or "").split(",") if m.strip()]
        endpoints = [e.strip() for e in (o["endpoints"] or "").split(",") if e.strip()]
        for e in endpoints:
            if not e.startswith("/v1/"):
                raise CommandError(f"--endpoints: {e!r} is not a /v1/ path")
        created = api_key_create(tenant=tenant, source=source, name=name, actor=cli_actor(), allowed_models=models,
                                 rpm=o["rpm"], tpm=o["tpm"], expires_days=o["expires_days"],
                                 allowed_endpoints=endpoints, default_budget_id=o["budget_id"],
                                 budget_id_binding=o["budget_id_binding"],
                                 cache_enabled={"on": True, "off": False}.get(o["cache"]),
                                 cache_ttl_s=o["cache_ttl"], via="cli")
        self.stdout.write(created.secret)
