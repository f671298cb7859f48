"""Celery application. Broker and result settings come from Django settings (CELERY_*)."""

import os

from celery import Celery
from celery.signals import celeryd_init, worker_ready, worker_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("llm_service")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@celeryd_init.connect
def _quiet_embedded_demo(**_kwargs):
    """The embedded demo (`make run`, LLMS_DEMO) is often run as root in a container: Celery's
    "running the worker with superuser privileges" warning is then noise (we accept JSON only, never
    pickle). Anywhere else it stays."""
    import warnings

    from celery.exceptions import SecurityWarning
    from django.conf import settings

    if settings.LLMS_DEMO:
        warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges",
                                category=SecurityWarning)


@worker_ready.connect
def _ledger_replay_at_start(**_kwargs):
    """Rows journaled on this host while the database was down go to the ledger (in a thread)."""
    from apps.analytics.journal import replay_in_background

    replay_in_background("worker start-up")


@worker_ready.connect
def _heartbeat_start(sender=None, **_kwargs):
    """Tell /readyz, the dashboard and the gateway which queues this worker consumes."""
    from apps.core import workers

    try:
        queues = [q.name for q in sender.task_consumer.queues]
    except AttributeError:
        queues = list(app.amqp.queues.consume_from or app.amqp.queues)
    workers.heartbeat_start(name=sender.hostname, queues=queues)


@worker_shutdown.connect
def _heartbeat_stop(sender=None, **_kwargs):
    from apps.core import workers

    workers.heartbeat_stop(name=getattr(sender, "hostname", "") or "")
