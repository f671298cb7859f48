from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _partitions_ahead(sender, using="default", **kwargs) -> None:
    """Every `migrate` creates the ledger's partitions ahead (PostgreSQL; a no-op elsewhere)."""
    from django.db import connections

    from .partitions import partitions_ensure

    partitions_ensure(conn=connections[using])


class AnalyticsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "apps.analytics"
    label = "analytics"

    def ready(self) -> None:
        post_migrate.connect(_partitions_ahead, sender=self, dispatch_uid="analytics-partitions-ahead")
