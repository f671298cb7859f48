"""A real Celery worker in a subprocess, on the test database and the configured broker (Redis when
CELERY_BROKER_URL is set, else the filesystem broker under var/celery). Beat runs inside it, with
a short lease and resume period, so a killed worker's work is picked up again within seconds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(settings.BASE_DIR)
LEASE_S = 3


def wait_for(condition, *, timeout: float = 60.0, what: str = "condition"):
    """Poll `condition` until it returns something truthy (and return it), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def until_done(sdk, batch_id, worker, timeout=90):
    """Wait for a batch to reach a final status (and return it); on a timeout, fail with the tail of
    the worker's log."""
    def done():
        b = sdk.batches.retrieve(batch_id)
        return b if b.status in ("completed", "failed", "cancelled", "expired") else None

    try:
        return wait_for(done, timeout=timeout, what=f"batch {batch_id} to finish")
    except AssertionError:
        raise AssertionError(worker.tail()) from None


def _database_url() -> str:
    s = connection.settings_dict
    if settings.IS_POSTGRES:
        auth = s["USER"] + (f":{s['PASSWORD']}" if s.get("PASSWORD") else "")
        return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    return f"sqlite:///{s['NAME']}"


def broker_reset() -> None:
    """Drop messages left by an earlier run, so a new worker starts on an empty broker."""
    if settings.CELERY_BROKER_URL.startswith("redis"):
        import redis

        redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    else:
        folder = Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])
        for f in folder.glob("*"):
            f.unlink(missing_ok=True)


class Worker:
    def __init__(self, concurrency: int = 4, *, plain: bool = False, **env):
        """`plain`: the command as Celery documents it, `celery -A config worker` (no -Q, no beat)."""
        self.concurrency = concurrency
        self.plain = plain
        self.dir = Path(tempfile.mkdtemp(prefix="celery-worker-"))
        self.log = self.dir / "worker.log"
        self.env = {
            **os.environ,
            "DATABASE_URL": _database_url(),
            "GATEWAY_JOB_LEASE_S": str(LEASE_S),
            "GATEWAY_JOBS_RESUME_EVERY_S": "1",
            "GATEWAY_ROUTES_CACHE_TTL_S": "0",
            "GATEWAY_AUTH_CACHE_TTL_S": "0",
            "GATEWAY_BATCH_TASK_BUDGET_S": "5",
            "CELERY_FS_POLLING_INTERVAL_S": "0.05",
            # The tests' webhook receivers listen on loopback: the operator allow-list lets them in.
            "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            **{k: str(v) for k, v in env.items()},
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        name = f"test-{uuid.uuid4().hex[:8]}@%h"
        if self.plain:
            cmd = [sys.executable, "-m", "celery", "-A", "config", "worker", "-n", name, "--pool", "threads",
                   "--loglevel", "INFO"]
        else:
            cmd = [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "threads",
                   "--concurrency", str(self.concurrency),
                   "-Q", "celery,async,batch,alerts,analytics", "-B", "-s", str(self.dir / "beat"), "-n", name,
                   "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        self._out = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(lambda: b" ready." in self.log.read_bytes() or self.proc.poll() is not None, timeout=60,
                 what="the Celery worker to start")
        if self.proc.poll() is not None:
            raise RuntimeError("worker died:\n" + self.log.read_text()[-4000:])
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: no graceful shutdown, no acks, tasks in flight are lost mid-way."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
