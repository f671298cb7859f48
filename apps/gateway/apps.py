from django.apps import AppConfig


class GatewayConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "apps.gateway"
    label = "gateway"

    def ready(self) -> None:
        """The gateway plugs into the apps it uses (they never import it): the models a key may be
        limited to, the deployments /readyz reports, their probes beside provider availability, the
        holds stored with queued work, the aliases the cost recommendations compare, and the routing
        table dropped when billing changes prices."""
        from apps.analytics.recommendations import alias_catalog_register
        from apps.analytics.selectors import provider_probes_register
        from apps.analytics.views import readyz_part_register
        from apps.billing.budgets import durable_holds_source
        from apps.core import caches
        from apps.keys.admin import model_names_provider

        from . import selectors

        model_names_provider(selectors.model_aliases)
        readyz_part_register(selectors.deployments_readiness)
        provider_probes_register(selectors.provider_probes)
        alias_catalog_register(selectors.alias_catalog)
        durable_holds_source(selectors.queued_holds)
        caches.on_invalidate(caches.ROUTING, selectors.routing_table_invalidate)
