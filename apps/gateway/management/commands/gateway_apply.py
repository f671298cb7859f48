from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from apps.gateway.config_schema import ConfigError, config_parse
from apps.gateway.services import config_apply
from apps.keys.services import cli_actor


class Command(BaseCommand):
    help = "Apply a declarative YAML config (providers, models, tenants). Idempotent; all or nothing."

    def add_arguments(self, parser):
        parser.add_argument("file")

    def handle(self, *args, file, **opts):
        path = Path(file)
        if not path.exists():
            raise CommandError(f"{file}: no such file")
        try:
            cfg = config_parse(path.read_text())
            config_apply(cfg=cfg, actor=cli_actor())
        except ConfigError as exc:
            raise CommandError("invalid config, nothing changed:\n" + "\n".join(exc.errors))
        self.stdout.write(self.style.SUCCESS(
            f"applied {file}: {len(cfg.providers)} providers, {len(cfg.models)} models, {len(cfg.tenants)} tenants"
        ))
