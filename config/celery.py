"""Celery application. Broker and result settings come from Django settings (CELERY_*)."""

import os

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("llm_service")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def _ledger_replay_at_start(**_kwargs):
    """Rows journaled on this host while the database was down go to the ledger (in a thread)."""
    from apps.analytics.journal import replay_in_background

    replay_in_background("worker start-up")
