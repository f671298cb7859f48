"""Celery entry points of analytics: idempotent, safe to run concurrently or twice."""

from celery import shared_task

from . import services


@shared_task(name="analytics.usage_rollup_recent", ignore_result=True)
def usage_rollup_recent() -> dict:
    return services.usage_rollup_recent()
