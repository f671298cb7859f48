from django.apps import AppConfig


class BillingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "apps.billing"
    label = "billing"

    def ready(self) -> None:
        """Budget gauges on /metrics, the budget counters' check of every new Redis server, and prices
        for the cost recommendations."""
        from apps.analytics.metrics import scrape_collector_register
        from apps.analytics.recommendations import price_quoter_register
        from apps.core import redis as core_redis

        from . import budgets, metrics, services

        scrape_collector_register(metrics.BudgetCollector)
        core_redis.on_new_server(budgets.on_new_server)
        price_quoter_register(services.price_quoter)
