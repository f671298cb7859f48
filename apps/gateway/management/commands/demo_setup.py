import hashlib
import hmac
import os

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from apps.gateway.config_schema import config_parse
from apps.gateway.services import config_apply, prices_sync
from apps.keys import crypto
from apps.keys.models import ApiKey, Source, Tenant
from apps.keys.services import audit_record, cli_actor, snapshot

DEMO_CONFIG = """
providers:
  - {name: mock, kind: mock}
models:
  - alias: gpt-4o-mini
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    cached_input_usd_per_mtok: 0.075
    deployments: [{provider: mock, model: mock-gpt-4o-mini}]
  - alias: claude-3-5-haiku
    input_usd_per_mtok: 0.80
    output_usd_per_mtok: 4.00
    deployments: [{provider: mock, model: mock-claude-3-5-haiku}]
  - alias: text-embedding-3-small
    input_usd_per_mtok: 0.02
    output_usd_per_mtok: 0
    deployments: [{provider: mock, model: mock-embedding}]
  - alias: gpt-4o  # no price here: prices_sync takes it from genai-prices
    deployments: [{provider: mock, model: mock-gpt-4o}]
tenants:
  - slug: demo
    name: Demo Org
    timezone: Europe/Berlin
    sources: [{name: demo-app, type: application}, {name: nightly-etl, type: service}]
    members: [{username: manager, email: manager@demo.test, role: manager, password_env: DEMO_MANAGER_PASSWORD}]
    budgets:
      - {name: demo-monthly, scope: tenant, limit_usd: 50, period: monthly, enforcement: hard,
         alert_thresholds: [0.5, 0.8, 1.0]}
"""


def demo_key_secret() -> str:
    """The demo key, derived from SECRET_KEY so every run of demo_setup prints the same one."""
    mac = hmac.new(settings.SECRET_KEY.encode(), b"demo-key", hashlib.sha256).hexdigest()
    return f"sk-demo-{mac[:40]}"


class Command(BaseCommand):
    help = "Idempotent demo: tenant 'demo', sources, mock models with prices, a key, an admin user."

    @transaction.atomic
    def handle(self, *args, **opts):
        os.environ.setdefault("DEMO_MANAGER_PASSWORD", "manager")
        config_apply(cfg=config_parse(DEMO_CONFIG), actor=cli_actor())
        prices_sync(actor=cli_actor())
        User = get_user_model()
        if not User.objects.filter(username="admin").exists():
            User.objects.create_superuser("admin", "admin@demo.test", os.environ.get("DEMO_ADMIN_PASSWORD", "admin"))
        tenant = Tenant.objects.get(slug="demo")
        secret = demo_key_secret()
        digest = crypto.api_key_digest(secret)
        if not ApiKey.objects.filter(digest=digest).exists():
            key = ApiKey.objects.create(
                tenant=tenant, source=Source.objects.get(tenant=tenant, name="demo-app"), name="demo-key",
                digest=digest, prefix=crypto.api_key_display_prefix(secret),
            )
            audit_record(actor=cli_actor(), action="create", obj=key, after=snapshot(key))
        self.stdout.write(secret)
