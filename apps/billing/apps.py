from django.apps import AppConfig


class BillingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "apps.billing"
    label = "billing"

    def ready(self) -> None:
        """Budget gauges on /metrics, and the budget counters' check of every new Redis server."""
        from apps.analytics.metrics import scrape_collector_register
        from apps.core import redis as core_redis

        from . import budgets, metrics

        scrape_collector_register(metrics.BudgetCollector)
        core_redis.on_new_server(budgets.on_new_server)
