"""Fixtures for async requests and batches: a real Celery worker subprocess and a webhook receiver."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.gateway.worker import Worker, broker_reset


@pytest.fixture
def celery_worker(live_gateway):
    """A worker on the test database (live_gateway makes the test transactional, so it sees rows)."""
    broker_reset()
    worker = Worker().start()
    yield worker
    worker.stop()
    print(worker.tail())  # shown by pytest only when the test failed
    worker.cleanup()


class WebhookReceiver:
    def __init__(self, fail_first: int = 0):
        self.calls: list[dict] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.calls.append({"headers": dict(self.headers), "body": body})
                status = 500 if len(receiver.calls) <= receiver.fail_first else 204
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(settings):
    """A receiver on loopback, let through by the operator allow-list (as an internal receiver)."""
    settings.WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    with WebhookReceiver(fail_first=1) as receiver:
        yield receiver
