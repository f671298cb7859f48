from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.gateway.config_schema import ConfigError, config_parse
from apps.gateway.services import config_apply
from apps.keys.services import cli_actor


class Command(BaseCommand):
    help = "Apply a declarative YAML config (providers, models, tenants). Idempotent; all or nothing."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--adopt", action="store_true",
                            help="accept tenants renamed to a slug of the file since their creation (by a "
                                 "superuser); without it such a tenant is refused and nothing changes")

    def handle(self, *args, file, adopt=False, **opts):
        path = Path(file)
        if not path.exists():
            raise CommandError(f"{file}: no such file")
        try:
            cfg = config_parse(path.read_text())
            config_apply(cfg=cfg, actor=cli_actor(), adopt=adopt)
        except ConfigError as exc:
            raise CommandError("invalid config, nothing changed:\n" + "\n".join(exc.errors))
        except ValidationError as exc:
            raise CommandError("refused, nothing changed:\n" + "\n".join(exc.messages))
        self.stdout.write(self.style.SUCCESS(
            f"applied {file}: {len(cfg.providers)} providers, {len(cfg.models)} models, {len(cfg.tenants)} tenants"
        ))
