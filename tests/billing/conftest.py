"""Billing fixtures: Celery run eagerly in the calling thread, and a webhook receiver on loopback."""

from __future__ import annotations

import collections
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from config.celery import app as celery_app


@pytest.fixture
def eager_celery():
    """Tasks run in the calling thread; their errors propagate to the test."""
    old = celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    yield
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = old


@pytest.fixture
def eager_celery_retrying(eager_celery):
    """Eager, with retries re-run at once (Celery only retries eagerly when errors don't propagate)."""
    celery_app.conf.task_eager_propagates = False


class WebhookReceiver:
    """Records every POST (headers, raw body); answers with the queued statuses, then 200."""

    def __init__(self):
        self.requests: list[dict] = []
        self.statuses: collections.deque[int] = collections.deque()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": headers, "body": body})
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="webhook-receiver")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/llm"


@pytest.fixture
def webhook(settings):
    """A receiver on loopback, let through by the operator allow-list (as an internal receiver)."""
    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    receiver = WebhookReceiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()
