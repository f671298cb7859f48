"""Celery conventions: a plain `celery -A config worker` consumes every queue of ours; /readyz, the
dashboard and the async 202 say when work waits with no worker consuming it."""

from __future__ import annotations

import logging
import os

import httpx
import pytest
from django.conf import settings

from apps.core import workers
from apps.gateway import queues
from tests.gateway.worker import Worker, broker_reset, wait_for


def envelope(alias: str, content: str = "hello") -> dict:
    return {"request": {"model": alias, "messages": [{"role": "user", "content": content}],
                        "options": {"async": True}}}


@pytest.fixture
def no_heartbeats():
    """No worker heartbeat from an earlier test (a stopped worker removes its own)."""
    if settings.REDIS_URL:
        from apps.core.redis import sync_client

        sync_client().delete(workers.HEARTBEAT_KEY)
    else:
        for f in (settings.VAR_DIR / "celery" / "workers").glob("*.json"):
            f.unlink()
    workers._reset()
    yield
    workers._reset()


def test_every_queue_tasks_use_is_declared_for_a_worker_without_q():
    from celery import current_app

    declared = {q.name for q in current_app.amqp.queues.values()}
    assert set(queues.QUEUE_OF.values()) | {"celery", "alerts", "analytics"} <= declared
    assert current_app.conf.task_default_queue == "celery"


def test_async_202_says_no_worker_seen_and_readyz_reports_the_unconsumed_queue(
        live_gateway, live_setup, no_heartbeats, client, admin_client):
    broker_reset()
    headers = {"Authorization": f"Bearer {live_setup.secret}"}
    resp = httpx.post(f"{live_gateway}/v1/requests", headers=headers, json=envelope(live_setup.alias))

    assert resp.status_code == 202
    assert resp.headers["x-gateway-worker"] == "none-seen"
    assert "No worker consuming the 'async' queue" in resp.json()["warning"]

    ready = client.get("/readyz", REMOTE_ADDR="127.0.0.1").json()
    # one message, in the async queue only (not a copy in every queue)
    assert {q: v["waiting"] for q, v in ready["workers"]["queues"].items()} == {
        "celery": 0, "async": 1, "batch": 0, "alerts": 0, "analytics": 0}
    assert ready["workers"]["queues"]["async"]["consumers"] == 0
    assert "async" in ready["workers"]["unconsumed"]
    page = admin_client.get("/dashboard/").content.decode()
    assert 'id="queues-unconsumed"' in page and "Work is waiting in async" in page


def test_plain_worker_command_consumes_async_queue_and_request_completes(live_gateway, live_setup, no_heartbeats):
    broker_reset()
    headers = {"Authorization": f"Bearer {live_setup.secret}"}
    resp = httpx.post(f"{live_gateway}/v1/requests", headers=headers, json=envelope(live_setup.alias, "plain"))
    assert resp.status_code == 202
    request_id = resp.json()["id"]

    worker = Worker(plain=True).start()
    try:
        def finished():
            body = httpx.get(f"{live_gateway}/v1/requests/{request_id}", headers=headers).json()
            return body if body["status"] in ("completed", "failed") else None

        done = wait_for(finished, timeout=60, what="the async request to finish")
        assert done["status"] == "completed", worker.tail()
        if os.geteuid() == 0:  # the embedded demo (LLMS_DEMO, set for tests) is quiet about root
            assert "superuser privileges" not in worker.tail()
        seen = workers.workers_seen()
        assert seen and set(workers.all_queues()) <= set(seen[0]["queues"])
        report = workers.queue_report()
        assert report["unconsumed"] == []

        workers._reset()
        again = httpx.post(f"{live_gateway}/v1/requests", headers=headers, json=envelope(live_setup.alias, "2"))
        assert again.status_code == 202
        assert "x-gateway-worker" not in again.headers
        assert "warning" not in again.json()
    finally:
        worker.stop()
        worker.cleanup()


def test_filesystem_broker_does_not_warn_about_a_missing_hostname(caplog):
    from kombu import Connection

    with caplog.at_level(logging.WARNING, logger="kombu.connection"):
        conn = Connection("filesystem://", transport="config.kombu_filesystem:Transport")
        conn._info()
    assert not [r for r in caplog.records if "hostname" in r.getMessage()]
