"""Drills that break the world and show the money guarantees held: a Redis restored from an older
snapshot, and the embedded mode's web and worker processes sharing one set of counters.
(PostgreSQL stopped under streaming load: tests/analytics/test_ledger_outage.py; a worker killed
mid-batch: tests/gateway/test_batches.py; Redis stopped mid-load: tests/gateway/test_admission.py.)"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from decimal import Decimal

import orjson
import pytest

from apps.analytics.models import UsageEvent
from apps.core.money import micros
from apps.gateway.models import AsyncRequest
from tests import factories as f
from tests.gateway.worker import Worker, broker_reset, wait_for
from tests.money import spend


def post(client, secret, body, path="/v1/chat/completions"):
    return client.post(path, data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


def ledger_total(tenant) -> Decimal:
    return sum(UsageEvent.objects.filter(tenant=tenant).values_list("cost", flat=True), Decimal(0))


class PrivateRedis:
    """A redis-server of the test's own, with a data directory, so it can be snapshotted, stopped
    and started again from that snapshot (never the shared one)."""

    def __init__(self, directory):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = directory
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2)

    def start(self) -> PrivateRedis:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop_without_saving(self) -> None:
        import redis

        try:
            self.client().shutdown(nosave=True)
        except redis.RedisError:
            pass
        self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")
@pytest.mark.django_db
def test_a_redis_restored_from_an_older_snapshot_is_rebuilt_from_the_ledger_before_admitting(
        client, setup, shared_state_at, tmp_path):
    """Before: the counters came back stale and a $0.30 total hard budget ended at $0.40. Now the
    server's run id differs from the one the counters were kept on: they are dropped and rebuilt
    from the ledger before anything is admitted, and the budget holds."""
    setup.price.input_usd_per_mtok, setup.price.output_usd_per_mtok = Decimal("1000"), Decimal("2000")
    setup.price.save()  # "hi" costs $0.01 here; a hold of max_tokens=20 about $0.08
    budget = f.BudgetFactory(tenant=setup.tenant, name="lifetime", limit_usd=Decimal("0.30"), period="total")
    server = PrivateRedis(tmp_path).start()
    try:
        with shared_state_at(server.url):
            def ask():
                return post(client, setup.secret, {"model": setup.alias, "max_tokens": 20,
                                                   "messages": [{"role": "user", "content": "hi"}]})

            assert ask().status_code == 200
            server.client().save()  # the snapshot: $0.01 spent
            assert [ask().status_code for _ in range(15)] == [200] * 15  # $0.16 spent
            server.stop_without_saving()
            server.start()  # back from the old snapshot, which says $0.01

            codes = []
            deadline = time.monotonic() + 30
            while 402 not in codes and time.monotonic() < deadline:
                codes.append(ask().status_code)  # a 503 while the new server is validated
                if codes[-1] == 200 and codes.count(200) == 1:
                    # the first admission after the restore already saw the ledger's spend
                    assert spend(budget)[0] >= Decimal("0.16")

            ledger = ledger_total(setup.tenant)
            spent, held = spend(budget)
    finally:
        server.kill()

    assert 402 in codes
    assert set(codes) <= {200, 402, 503}
    assert ledger <= budget.limit_usd  # before the fix: about $0.40
    assert held == 0
    assert spent == Decimal(micros(ledger)) / 1_000_000


@pytest.mark.django_db(transaction=True)
def test_embedded_async_requests_settle_where_they_were_admitted(client, setup, shared_state_at):
    """Break 1: in the embedded default (no Redis) every finished async request left its hold in the
    web process's memory for a day, and a small hard budget soon refused what it should accept.
    Now web and worker share one set of counters (a SQLite file): 20 async requests in a row on a
    budget that holds three at a time are all admitted, and nothing stays held."""
    setup.price.input_usd_per_mtok, setup.price.output_usd_per_mtok = Decimal("1"), Decimal("2")
    setup.price.save()
    budget = f.BudgetFactory(tenant=setup.tenant, name="small", limit_usd=Decimal("0.007"), period="total")
    broker_reset()
    with shared_state_at(""):
        worker = Worker(REDIS_URL="").start()
        try:
            statuses = []
            for i in range(20):
                resp = post(client, setup.secret, {"request": {
                    "model": setup.alias, "messages": [{"role": "user", "content": f"question {i}"}],
                    "options": {"async": True, "max_tokens": 1000}}}, path="/v1/requests")
                statuses.append(resp.status_code)
                assert resp.status_code == 202, (i, resp.content)
                rid = resp.json()["id"]
                wait_for(lambda rid=rid: AsyncRequest.objects.get(id=rid).status in ("completed", "failed"),
                         timeout=60, what=f"async request {i}")
            spent, held = spend(budget)
        finally:
            worker.stop()
            print(worker.tail())
            worker.cleanup()

    assert statuses == [202] * 20
    assert set(AsyncRequest.objects.values_list("status", flat=True)) == {"completed"}
    assert held == 0
    ledger = ledger_total(setup.tenant)
    assert ledger > 0 and spent == Decimal(micros(ledger)) / 1_000_000
