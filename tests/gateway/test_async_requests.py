"""Async requests: `async: true` answers 202 after admission; a real Celery worker runs the pipeline;
GET /v1/requests/{id} polls it; a signed webhook announces it."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import httpx
import orjson
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils import timezone

from apps.analytics.models import UsageEvent
from apps.core.money import micros, usd
from apps.gateway import async_requests, queues
from apps.gateway.models import AsyncRequest
from apps.keys.outbound import signature_verify
from apps.keys.services import tenant_webhook_secret
from tests import factories as f
from tests.gateway.worker import Worker, broker_reset, wait_for
from tests.money import SETTLE, WorkerStopped, spend, stops_the_worker


def envelope(alias: str, content: str = "hello", **options) -> dict:
    return {"request": {"model": alias, "messages": [{"role": "user", "content": content}],
                        "options": {"async": True, **options}, "metadata": {"priority": 7}}}


def test_async_request_end_to_end_with_polling_and_signed_webhook(celery_worker, live_gateway, live_setup, webhook):
    headers = {"Authorization": f"Bearer {live_setup.secret}"}
    resp = httpx.post(f"{live_gateway}/v1/requests", headers=headers,
                      json=envelope(live_setup.alias, "async hello", callback_url=webhook.url, max_tokens=50))

    assert resp.status_code == 202
    accepted = resp.json()
    assert accepted["status"] == "queued"
    assert accepted["id"] == resp.headers["x-request-id"]

    def finished():
        body = httpx.get(f"{live_gateway}/v1/requests/{accepted['id']}", headers=headers).json()
        return body if body["status"] in ("completed", "failed") else None

    done = wait_for(finished, timeout=60, what="the async request to finish")
    assert done["status"] == "completed", celery_worker.tail()
    assert done["result"]["choices"][0]["message"]["content"] == "Echo: async hello"
    event = UsageEvent.objects.get(request_id=accepted["id"])
    assert event.is_async
    assert event.priority == 7
    assert done["usage"]["completion_tokens"] == event.completion_tokens
    assert done["usage"]["cost"] == str(event.cost)

    # The receiver refuses the first delivery; Celery retries with backoff until it is accepted.
    wait_for(lambda: len(webhook.calls) >= 2, timeout=60, what="the webhook retry")
    call = webhook.calls[-1]
    assert signature_verify(header=call["headers"]["x-llm-signature"], body=call["body"],
                            secret=tenant_webhook_secret(tenant_id=live_setup.tenant.pk))
    assert orjson.loads(call["body"])["id"] == accepted["id"]
    assert orjson.loads(call["body"])["status"] == "completed"
    wait_for(lambda: AsyncRequest.objects.get(id=accepted["id"]).webhook_delivered_at, what="delivery mark")
    assert UsageEvent.objects.filter(request_id=accepted["id"]).count() == 1


def test_async_chat_completion_extra_field_fails_cleanly_on_upstream_error(celery_worker, live_gateway, live_setup):
    live_setup.deployment.upstream_model = "fail-400"
    live_setup.deployment.save()
    headers = {"Authorization": f"Bearer {live_setup.secret}"}
    resp = httpx.post(f"{live_gateway}/v1/chat/completions", headers=headers,
                      json={"model": live_setup.alias, "messages": [{"role": "user", "content": "x"}], "async": True})

    assert resp.status_code == 202
    rid = resp.json()["id"]
    done = wait_for(lambda: (b := httpx.get(f"{live_gateway}/v1/requests/{rid}", headers=headers).json())["status"]
                    in ("completed", "failed") and b, what="the request to fail")
    assert done["status"] == "failed"
    assert done["error"]["status"] == 400
    assert UsageEvent.objects.get(request_id=rid).status == 400


def test_async_request_survives_a_worker_killed_mid_call(live_gateway, live_setup):
    live_setup.deployment.upstream_model = "slow-1500"
    live_setup.deployment.save()
    headers = {"Authorization": f"Bearer {live_setup.secret}"}
    broker_reset()
    first = Worker().start()
    try:
        rid = httpx.post(f"{live_gateway}/v1/requests", headers=headers, json=envelope(live_setup.alias)).json()["id"]
        wait_for(lambda: AsyncRequest.objects.get(id=rid).status == "running", what="the worker to take it")
        first.kill()
    finally:
        first.stop()
    second = Worker().start()
    try:
        done = wait_for(lambda: AsyncRequest.objects.filter(id=rid, status__in=("completed", "failed")).first(),
                        timeout=60, what="the request to finish after the restart")
    finally:
        second.stop()
        first.cleanup()
        second.cleanup()

    assert done.status == "completed"
    assert done.attempts == 2
    assert UsageEvent.objects.filter(request_id=rid).count() == 1


@pytest.mark.skipif(not settings.CELERY_BROKER_URL.startswith("redis"), reason="the filesystem broker has no priority")
def test_more_urgent_requests_run_first(live_gateway, live_setup):
    headers = {"Authorization": f"Bearer {live_setup.secret}"}
    broker_reset()
    ids = {}
    for priority in (0, 9, 5):  # queued while no worker runs
        body = envelope(live_setup.alias)
        body["request"]["metadata"]["priority"] = priority
        ids[priority] = httpx.post(f"{live_gateway}/v1/requests", headers=headers, json=body).json()["id"]
    worker = Worker(concurrency=1).start()
    try:
        wait_for(lambda: AsyncRequest.objects.filter(status="completed").count() == 3, what="all three to run")
    finally:
        worker.stop()
        worker.cleanup()

    order = list(AsyncRequest.objects.order_by("started_at").values_list("priority", flat=True))
    assert order == [9, 5, 0]


def test_the_openai_sdk_can_send_an_async_chat_completion(live_gateway, live_setup, monkeypatch):
    import openai

    from apps.gateway import queues

    monkeypatch.setattr(queues, "publish", lambda *a, **k: None)
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=live_setup.secret, max_retries=0)

    raw = client.chat.completions.with_raw_response.create(
        model=live_setup.alias, messages=[{"role": "user", "content": "later"}], extra_body={"async": True})

    assert raw.http_response.status_code == 202
    assert AsyncRequest.objects.get(id=raw.http_response.json()["id"]).status == "queued"


# --- without a worker -------------------------------------------------------------------------

def _post(client, secret, body, path="/v1/requests"):
    return client.post(path, data=orjson.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.fixture
def no_broker(monkeypatch):
    """Publishing is the broker's business; these tests look at what the gateway stored."""
    published = []
    from apps.gateway import queues

    monkeypatch.setattr(queues, "publish", lambda name, *a, **k: published.append((name, a, k)))
    return published


@pytest.mark.django_db(transaction=True)
def test_only_the_owning_tenant_can_read_an_async_request(client, setup, no_broker):
    resp = _post(client, setup.secret, envelope(setup.alias))
    rid = resp.json()["id"]
    outsider = f.ApiKeyFactory()

    own = client.get(f"/v1/requests/{rid}", HTTP_AUTHORIZATION=f"Bearer {setup.secret}")
    other = client.get(f"/v1/requests/{rid}", HTTP_AUTHORIZATION=f"Bearer {outsider.secret}")

    assert own.status_code == 200
    assert own.json()["status"] == "queued"
    assert own.json()["result"] is None
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "not_found"


@pytest.mark.django_db(transaction=True)
def test_async_request_is_admitted_stored_and_published_with_its_priority(client, setup, no_broker):
    resp = _post(client, setup.secret, envelope(setup.alias))

    assert resp.status_code == 202
    row = AsyncRequest.objects.get(id=resp.json()["id"])
    assert row.tenant_id == setup.tenant.id
    assert row.priority == 7
    assert row.admission is not None  # what admission took, for the worker to settle or release
    (name, args, kwargs), = no_broker
    assert (name, args) == (queues.ASYNC_RUN, (row.id,))
    assert kwargs["priority"] == async_requests.celery_priority(7) == 2
    assert not UsageEvent.objects.exists()  # the ledger row comes when the worker has run it


@pytest.mark.django_db(transaction=True)
def test_an_async_request_whose_worker_died_on_every_attempt_is_given_up(client, setup, no_broker):
    rid = _post(client, setup.secret, envelope(setup.alias)).json()["id"]
    AsyncRequest.objects.filter(id=rid).update(attempts=settings.GATEWAY_JOB_MAX_ATTEMPTS)

    async_requests.async_request_run(request_id=rid)

    row = AsyncRequest.objects.get(id=rid)
    assert row.status == "failed"
    assert row.error["code"] == "worker_failed"
    assert UsageEvent.objects.get(request_id=rid).status == 500


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stopped_at", [SETTLE, "apps.gateway.async_requests._finish"])
def test_a_request_whose_worker_stopped_after_its_ledger_row_settles_its_hold_once(client, setup, upstream, no_broker,
                                                                                  monkeypatch, stopped_at):
    """Stopped before its settle: the next run ends `result_lost` and settles the stored hold with
    the row's cost (before: it was left to expire, counted meanwhile). Stopped after its settle:
    the next run must not count the cost a second time."""
    budget = f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("10"), period="total")
    rid = _post(client, setup.secret, envelope(setup.alias, max_tokens=20)).json()["id"]
    with monkeypatch.context() as stop:
        stop.setattr(stopped_at, stops_the_worker)
        with pytest.raises(WorkerStopped):
            async_requests.async_request_run(request_id=rid)
    cost = usd(micros(UsageEvent.objects.get(request_id=rid).cost))  # as the counters count it
    if stopped_at == SETTLE:
        assert spend(budget)[1] > 0  # the hold its worker did not end
    else:
        assert spend(budget) == (cost, Decimal(0))  # settled before its worker stopped
    AsyncRequest.objects.filter(id=rid).update(lease_until=timezone.now() - timedelta(seconds=1))
    sent = len(upstream.requests)

    async_requests.async_request_run(request_id=rid)

    row = AsyncRequest.objects.get(id=rid)
    assert (row.status, row.error["code"]) == ("failed", "result_lost")
    assert len(upstream.requests) == sent  # not sent again
    assert UsageEvent.objects.filter(request_id=rid).count() == 1
    assert spend(budget) == (cost, Decimal(0))


@pytest.mark.django_db
@pytest.mark.parametrize(("options", "param"), [({"stream": True}, "stream"),
                                                ({"callback_url": "ftp://x"}, "request.options.callback_url")])
def test_async_request_rejects_stream_and_bad_callback(client, setup, no_broker, options, param):
    resp = _post(client, setup.secret, envelope(setup.alias, **options))

    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param
    assert not AsyncRequest.objects.exists()
    assert not no_broker


@pytest.mark.django_db
def test_async_request_needs_a_valid_key(client, setup, no_broker):
    resp = _post(client, "sk-wrong", envelope(setup.alias))

    assert resp.status_code == 401
    assert not AsyncRequest.objects.exists()


@pytest.mark.django_db
def test_purge_deletes_finished_requests_past_the_retention(setup):
    now = timezone.now()
    old = timezone.now() - timedelta(seconds=settings.GATEWAY_ASYNC_RESULT_TTL_S + 60)
    for rid, status, completed_at in [("req_old", "completed", old), ("req_new", "completed", now),
                                      ("req_oldfail", "failed", old), ("req_running", "running", None)]:
        AsyncRequest.objects.create(id=rid, tenant=setup.tenant, body={}, status=status, completed_at=completed_at)

    assert async_requests.async_requests_purge() == 2
    assert set(AsyncRequest.objects.values_list("id", flat=True)) == {"req_new", "req_running"}


def test_priority_maps_to_celery_priority_most_urgent_first():
    assert [async_requests.celery_priority(p) for p in (0, 5, 9, 42)] == [9, 4, 0, 0]


def test_a_hold_survives_the_trip_through_json_to_the_worker():
    from datetime import UTC, datetime
    from decimal import Decimal

    from apps.billing.budgets import Hold, HoldPeriod, open_holds
    from apps.billing.selectors import BudgetRef
    from apps.core.state import BudgetCell, LimitCell

    ref = BudgetRef(id=3, tenant_id=1, name="m", scope="tenant", scope_value="", limit_usd=Decimal("1.5"),
                    period="monthly", hard=True, shrink_max_tokens=False, timezone="Europe/Berlin")
    hold = Hold(request_id="req_x",
                limits=[LimitCell(key="llms:rl:k1:tpm", limit=1000, cost=42, share=0.8, kind="tokens")],
                budgets=[HoldPeriod(ref=ref, cell=BudgetCell(key="llms:bud:3:2026-11", limit_micros=1_500_000,
                                                             hold_micros=1234, hard=True, ttl_s=3600),
                                    period_start=datetime(2026, 11, 1, tzinfo=UTC), period_end=None)],
                token_estimate=42, ttl_s=86400)
    back = Hold.from_dict(orjson.loads(orjson.dumps(hold.to_dict())))

    assert back.to_dict() == hold.to_dict()
    assert back in open_holds()  # the worker took it over: it owns the exit now
    async_to_sync(back.release)()
    assert back not in open_holds()



@pytest.mark.django_db(transaction=True)
def test_an_async_requests_hold_outlives_the_sync_hold_ttl(client, setup, no_broker, monkeypatch):
    """Queued work may wait (backlog, leases, retries) longer than a sync request's hold TTL; its hold
    must not expire before the worker settles or releases it, or a hard budget could be passed."""
    import time
    import types

    from apps.core import state as gateway_state

    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.00015"))  # room for one hold of max_tokens=50
    assert _post(client, setup.secret, envelope(setup.alias, max_tokens=50)).status_code == 202
    later = time.time() + settings.GATEWAY_HOLD_TTL_S + 600
    monkeypatch.setattr(gateway_state, "time", types.SimpleNamespace(time=lambda: later, monotonic=time.monotonic))

    resp = _post(client, setup.secret, {"model": setup.alias, "messages": [{"role": "user", "content": "hello"}],
                                        "max_tokens": 50}, path="/v1/chat/completions")

    assert resp.status_code == 402


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("shrink", [False, True])
def test_the_worker_calls_the_upstream_with_the_max_tokens_its_hold_was_taken_for(client, setup, upstream, no_broker,
                                                                                  shrink):
    """Admission may cap max_tokens (hard budget, none asked: the model's limit) or lower it to fit
    (shrink_max_tokens); the hold covers that bound only, so the worker must send it too."""
    f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("0.0001") if shrink else Decimal("10"),
                    shrink_max_tokens=shrink)
    resp = _post(client, setup.secret, envelope(setup.alias, max_tokens=1000) if shrink else envelope(setup.alias))
    assert resp.status_code == 202
    admitted = resp["x-gateway-max-tokens-lowered"] if shrink else str(setup.deployment.alias.max_output_tokens)

    async_requests.async_request_run(request_id=resp.json()["id"])

    assert AsyncRequest.objects.get(id=resp.json()["id"]).status == "completed"
    assert str(upstream.requests[-1]["body"]["max_tokens"]) == admitted


@pytest.mark.django_db(transaction=True)
def test_queued_work_of_a_key_that_expired_meanwhile_is_not_run_nor_billed(client, setup, upstream, no_broker):
    """Before: the worker re-checked revocation but not expiry, so an expired key's queued work still
    ran and was billed."""
    budget = f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("1"), period="total")
    rid = _post(client, setup.secret, envelope(setup.alias, max_tokens=20)).json()["id"]
    setup.key.expires_at = timezone.now() - timedelta(seconds=1)
    setup.key.save()
    sent_before = len(upstream.requests)

    async_requests.async_request_run(request_id=rid)

    row = AsyncRequest.objects.get(id=rid)
    assert (row.status, row.error["code"]) == ("failed", "invalid_api_key")
    assert "expired" in row.error["message"]
    assert len(upstream.requests) == sent_before  # never sent upstream
    event = UsageEvent.objects.get(request_id=rid)
    assert (event.status, event.cost) == (401, 0)
    assert spend(budget) == (Decimal(0), Decimal(0))  # the hold taken at enqueue was given back


def test_an_async_request_of_a_logging_tenant_gets_its_request_log_from_the_worker(celery_worker, live_gateway,
                                                                                   live_setup):
    from apps.analytics.models import RequestLog, RequestLogPolicy

    RequestLogPolicy.objects.create(tenant=live_setup.tenant, bodies=True)
    resp = httpx.post(f"{live_gateway}/v1/requests", headers={"Authorization": f"Bearer {live_setup.secret}"},
                      json=envelope(live_setup.alias, "logged later"))
    assert resp.status_code == 202

    log = wait_for(lambda: RequestLog.objects.filter(request_id=resp.json()["id"]).first(), timeout=60,
                   what="the worker's request log")
    assert log.status == 200 and "logged later" in log.request_body and "Echo: logged later" in log.response_body
    assert [a["outcome"] for a in log.attempts] == ["ok"]
