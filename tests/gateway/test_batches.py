"""OpenAI Files and Batches through the official OpenAI SDK, run by a real Celery worker."""

from __future__ import annotations

import io
from datetime import timedelta
from decimal import Decimal

import openai
import orjson
import pytest
from asgiref.sync import async_to_sync
from django.db.models import Count
from django.utils import timezone

from apps.analytics.models import UsageEvent
from apps.core.money import micros, usd
from apps.gateway import admission
from apps.gateway.models import Batch, BatchLine
from tests import factories as f
from tests.gateway.worker import Worker, broker_reset, until_done, wait_for
from tests.money import SETTLE, WorkerStopped, spend, stops_the_worker


@pytest.fixture
def sdk(live_gateway, live_setup):
    return openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=live_setup.secret, max_retries=0)


def jsonl(alias: str, n: int, *, bad: bool = False) -> bytes:
    lines = [orjson.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": alias, "messages": [{"role": "user", "content": f"question {i}"}],
                                    "max_tokens": 20}}) for i in range(n)]
    if bad:
        lines.append(b'{"custom_id": "broken", "method": "POST", "url": "/v1/chat/co')  # not JSON
        lines.append(orjson.dumps({"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": alias}}))
        lines.append(orjson.dumps({"custom_id": "line-0", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": alias, "messages": [{"role": "user", "content": "dup"}]}}))
    return b"\n".join(lines) + b"\n"


def run_batch(sdk, alias, n, **kw):
    uploaded = sdk.files.create(file=("in.jsonl", io.BytesIO(jsonl(alias, n, **kw))), purpose="batch")
    return sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "nightly"})


def read_jsonl(sdk, file_id) -> list[dict]:
    return [orjson.loads(line) for line in sdk.files.content(file_id).content.splitlines() if line.strip()]


def test_batch_through_the_sdk_completes_with_output_and_error_files(celery_worker, sdk, live_setup):
    live_setup.price.batch_discount = Decimal("0.5")
    live_setup.price.save()
    batch = run_batch(sdk, live_setup.alias, 24, bad=True)
    assert batch.status == "validating"

    done = until_done(sdk, batch.id, celery_worker)

    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (27, 24, 3)
    assert sdk.files.retrieve(done.output_file_id).purpose == "batch_output"
    out = read_jsonl(sdk, done.output_file_id)
    assert [o["custom_id"] for o in out] == [f"line-{i}" for i in range(24)]
    assert all(o["response"]["status_code"] == 200 for o in out)
    assert out[3]["response"]["body"]["choices"][0]["message"]["content"] == "Echo: question 3"
    errors = {e["custom_id"]: e for e in read_jsonl(sdk, done.error_file_id)}
    assert set(errors) == {"", "no-messages", "line-0"}  # unparseable, invalid body, duplicate id
    assert errors["no-messages"]["response"]["status_code"] == 400
    assert errors["no-messages"]["response"]["body"]["error"]["param"] == "messages"
    # Every line is in the ledger, once, under the batch id, async, at the price the provider billed:
    # the lines ran as ordinary calls (no provider batch API), so the price's batch discount does not
    # apply (it did before: spend recorded at half, a hard budget stretched twofold).
    events = UsageEvent.objects.filter(batch_id=batch.id)
    assert events.count() == 27
    assert events.values("request_id").distinct().count() == 27
    ok = events.filter(status=200)
    assert ok.count() == 24
    assert all(e.is_async for e in events)
    e = ok.first()
    assert e.cost == (Decimal(e.prompt_tokens * 1 + e.completion_tokens * 2) / 1_000_000).quantize(e.cost)
    assert sdk.batches.list().data[0].id == batch.id


def test_cancel_stops_the_remaining_lines(celery_worker, sdk, live_setup):
    live_setup.deployment.upstream_model = "slow-150"
    live_setup.deployment.save()
    batch = run_batch(sdk, live_setup.alias, 40)
    wait_for(lambda: BatchLine.objects.filter(batch_id=batch.id, status="completed").exists(),
             what="the first line to finish")

    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = until_done(sdk, batch.id, celery_worker)

    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    ran = done.request_counts.completed + done.request_counts.failed
    assert 0 < ran < 40
    cancelled = [e for e in read_jsonl(sdk, done.error_file_id) if e["error"]]
    assert len(cancelled) == 40 - ran
    assert {e["error"]["code"] for e in cancelled} == {"batch_cancelled"}
    assert UsageEvent.objects.filter(batch_id=batch.id).count() == ran  # cancelled lines never ran


def test_worker_killed_mid_batch_and_restarted_finishes_with_one_ledger_row_per_line(live_gateway, sdk, live_setup):
    """Also the hold of every line ends once: lines run again under the same request id are admitted
    once (before: each took a second hold, and `held` stayed above zero forever on a total budget)."""
    live_setup.deployment.upstream_model = "slow-100"
    live_setup.deployment.save()
    total = f.BudgetFactory(tenant=live_setup.tenant, name="lifetime", limit_usd=Decimal("100"), period="total")
    broker_reset()
    first = Worker().start()
    try:
        batch = run_batch(sdk, live_setup.alias, 30)
        wait_for(lambda: BatchLine.objects.filter(batch_id=batch.id, status="completed").count() >= 6,
                 what="some lines to finish")
        first.kill()
    finally:
        first.stop()
    assert BatchLine.objects.filter(batch_id=batch.id).exclude(status="completed").exists()

    second = Worker().start()
    try:
        done = until_done(sdk, batch.id, second)
    finally:
        second.stop()
        first.cleanup()
        second.cleanup()

    assert done.status == "completed"
    assert done.request_counts.total == 30
    seen = [o["custom_id"] for o in read_jsonl(sdk, done.output_file_id)]
    if done.error_file_id:  # a line whose worker died between its ledger row and its answer
        seen += [e["custom_id"] for e in read_jsonl(sdk, done.error_file_id)]
        assert {e["error"]["code"] for e in read_jsonl(sdk, done.error_file_id)} == {"result_lost"}
    assert sorted(seen) == sorted(f"line-{i}" for i in range(30))
    rows = UsageEvent.objects.filter(batch_id=batch.id).values("request_id").annotate(n=Count("id"))
    assert len(rows) == 30
    spent, held = spend(total)
    assert held == 0
    ledger = sum(UsageEvent.objects.filter(tenant=live_setup.tenant).values_list("cost", flat=True))
    assert ledger <= spent <= ledger + Decimal("0.000001") * 30  # whole micro-dollars, rounded up
    assert {r["n"] for r in rows} == {1}


def test_batch_stops_at_a_hard_budget_and_fails_the_rest_with_budget_exceeded(celery_worker, sdk, live_setup):
    # A line holds at most (prompt bytes + 20 completion tokens) at 1 and 2 $/Mtok, under 0.0001 $, and
    # costs about 0.000013 $: a few lines fit in the budget, twenty do not.
    f.BudgetFactory(tenant=live_setup.tenant, limit_usd=Decimal("0.00015"), period="total", enforcement="hard")
    batch = run_batch(sdk, live_setup.alias, 20)

    done = until_done(sdk, batch.id, celery_worker)

    assert done.status == "completed"
    assert 0 < done.request_counts.completed < 20
    assert done.request_counts.failed == 20 - done.request_counts.completed
    errors = read_jsonl(sdk, done.error_file_id)
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"budget_exceeded"}
    spent = sum(e.cost for e in UsageEvent.objects.filter(batch_id=batch.id))
    assert spent <= Decimal("0.00015")
    assert UsageEvent.objects.filter(batch_id=batch.id).count() == 20


# --- without a worker -------------------------------------------------------------------------


def _upload(client, secret, content: bytes, purpose="batch"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return client.post("/v1/files", data={"purpose": purpose, "file": SimpleUploadedFile("in.jsonl", content)},
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.mark.django_db
@pytest.mark.parametrize(("content", "purpose", "code"), [
    (b"", "batch", "empty_file"),
    (b"\xff\xfe", "batch", "invalid_file"),
    (b'{"a": 1}\n', "fine-tune", None),
])
def test_upload_rejects_unusable_files(client, setup, content, purpose, code):
    resp = _upload(client, setup.secret, content, purpose)

    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == code


@pytest.mark.django_db
def test_upload_rejects_files_over_the_size_and_line_limits(client, setup, settings):
    settings.GATEWAY_BATCH_MAX_LINES = 2
    assert _upload(client, setup.secret, jsonl(setup.alias, 3)).json()["error"]["code"] == "too_many_lines"
    settings.GATEWAY_FILE_MAX_BYTES = 10
    assert _upload(client, setup.secret, jsonl(setup.alias, 1)).json()["error"]["code"] == "file_too_large"


@pytest.mark.django_db
def test_files_and_batches_belong_to_their_tenant(client, setup, monkeypatch):
    from apps.gateway import queues

    monkeypatch.setattr(queues, "publish", lambda *a, **k: None)
    uploaded = _upload(client, setup.secret, jsonl(setup.alias, 2)).json()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {setup.secret}"}
    created = client.post("/v1/batches", data={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"}, content_type="application/json", **auth)
    outsider = {"HTTP_AUTHORIZATION": f"Bearer {f.ApiKeyFactory().secret}"}

    assert created.status_code == 200
    assert created.json()["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert client.get(f"/v1/files/{uploaded['id']}/content", **auth).content == jsonl(setup.alias, 2)
    assert client.get(f"/v1/files/{uploaded['id']}", **outsider).status_code == 404
    assert client.get(f"/v1/files/{uploaded['id']}/content", **outsider).status_code == 404
    assert client.get(f"/v1/batches/{created.json()['id']}", **outsider).status_code == 404
    assert client.post(f"/v1/batches/{created.json()['id']}/cancel", **outsider).status_code == 404
    assert client.get("/v1/batches", **outsider).json()["data"] == []
    assert Batch.objects.get().tenant_id == setup.tenant.id


@pytest.mark.django_db
def test_batch_create_validates_its_fields(client, setup):
    uploaded = _upload(client, setup.secret, jsonl(setup.alias, 1)).json()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {setup.secret}"}

    def create(**body):
        data = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
                **body}
        return client.post("/v1/batches", data=data, content_type="application/json", **auth).json()["error"]

    assert create(endpoint="/v1/completions")["param"] == "endpoint"
    assert create(completion_window="1h")["param"] == "completion_window"
    assert create(input_file_id="file-nope")["param"] == "input_file_id"


@pytest.mark.django_db
def test_a_batch_past_its_completion_window_expires_with_the_remaining_lines_in_the_error_file(setup, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from apps.gateway import batches, queues, tasks
    from apps.keys.selectors import api_key_auth_by_id

    monkeypatch.setattr(queues, "publish", lambda *a, **k: None)
    monkeypatch.setattr(tasks.batch_lane, "apply_async", lambda *a, **k: None)
    upload = batches.file_create(tenant_id=setup.tenant.id, purpose="batch", filename="in.jsonl",
                                 content=jsonl(setup.alias, 3))
    batch = batches.batch_create(auth=api_key_auth_by_id(key_id=setup.key.id), input_file_id=upload.id,
                                 endpoint="/v1/chat/completions", completion_window="24h", metadata=None)
    batches.batch_start(batch_id=batch.id)
    Batch.objects.filter(id=batch.id).update(expires_at=timezone.now() - timedelta(seconds=1))

    tasks.batch_lane.apply(args=[batch.id])

    batch.refresh_from_db()
    assert batch.status == "expired"
    assert batch.expired_at is not None
    assert batches.batch_view(batch)["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    errors = [orjson.loads(line) for line in bytes(batch.error_file.content).splitlines()]
    assert [e["error"]["code"] for e in errors] == ["batch_expired"] * 3
    assert batch.output_file is None
    assert not UsageEvent.objects.exists()


# --- what a line does with admission's answers (admission itself is stood in for here) ---------


@pytest.fixture
def lane_factory(setup, monkeypatch):
    """`make(content)`: a batch of that input file, started, whose lanes run in this process when called."""
    from apps.gateway import batches, queues, tasks
    from apps.keys.selectors import api_key_auth_by_id

    published = []
    monkeypatch.setattr(queues, "publish", lambda *a, **k: None)
    monkeypatch.setattr(tasks.batch_lane, "apply_async", lambda *a, **k: published.append(k))

    def make(content: bytes):
        upload = batches.file_create(tenant_id=setup.tenant.id, purpose="batch", filename="in.jsonl",
                                     content=content)
        batch = batches.batch_create(auth=api_key_auth_by_id(key_id=setup.key.id), input_file_id=upload.id,
                                     endpoint="/v1/chat/completions", completion_window="24h", metadata=None)
        batches.batch_start(batch_id=batch.id)
        return batch, (lambda: tasks.batch_lane.apply(args=[batch.id])), published

    return make


@pytest.fixture
def lane(setup, lane_factory):
    """A batch of 4 lines, started, whose lanes run in this process when called."""
    return lane_factory(jsonl(setup.alias, 4))


def _admit_answers(monkeypatch, answers):
    """admission.admit answers from the list in turn: None admits, a GatewayError refuses."""
    from apps.gateway.errors import GatewayError

    original = admission.admit

    async def admit(ctx, policy):
        answer = answers.pop(0) if answers else None
        if isinstance(answer, GatewayError):
            raise answer
        return await original(ctx, policy)

    monkeypatch.setattr(admission, "admit", admit)


@pytest.mark.django_db
def test_lines_refused_by_a_budget_fail_with_budget_exceeded_and_are_in_the_ledger(lane, monkeypatch):
    from apps.gateway.errors import GatewayError

    batch, run, _ = lane
    over = GatewayError(402, "Budget 'b' is exhausted.", code="budget_exceeded")
    _admit_answers(monkeypatch, [None, None, over, over])

    run()

    batch.refresh_from_db()
    assert (batch.status, batch.completed, batch.failed) == ("completed", 2, 2)
    errors = [orjson.loads(x) for x in bytes(batch.error_file.content).splitlines()]
    assert [e["response"]["body"]["error"]["code"] for e in errors] == ["budget_exceeded"] * 2
    assert sorted(UsageEvent.objects.filter(batch_id=batch.id).values_list("status", flat=True)) == [200, 200, 402, 402]


@pytest.mark.django_db
def test_a_line_our_rate_limiter_turns_away_waits_and_leaves_no_ledger_row(lane, monkeypatch):
    from apps.gateway.errors import GatewayError

    batch, run, published = lane
    _admit_answers(monkeypatch, [None, GatewayError(429, "Slow down.", code="rate_limit_exceeded",
                                                    headers={"Retry-After": "7"})])

    run()

    assert published == [{"args": [batch.id], "countdown": 7.0}]
    assert list(BatchLine.objects.filter(batch_id=batch.id).values_list("status", flat=True)) == [
        "completed", "queued", "queued", "queued"]
    assert UsageEvent.objects.filter(batch_id=batch.id).count() == 1

    run()  # the continuation

    batch.refresh_from_db()
    assert (batch.status, batch.completed, batch.failed) == ("completed", 4, 0)
    assert UsageEvent.objects.filter(batch_id=batch.id, status=200).count() == 4


def test_sdk_lists_and_deletes_files(sdk, live_setup, monkeypatch):
    from apps.gateway import queues

    monkeypatch.setattr(queues, "publish", lambda *a, **k: None)
    kept = sdk.files.create(file=("a.jsonl", io.BytesIO(jsonl(live_setup.alias, 1))), purpose="batch")
    used = sdk.files.create(file=("b.jsonl", io.BytesIO(jsonl(live_setup.alias, 1))), purpose="batch")
    sdk.batches.create(input_file_id=used.id, endpoint="/v1/chat/completions", completion_window="24h")

    assert {f.id for f in sdk.files.list(purpose="batch")} == {kept.id, used.id}
    assert sdk.files.delete(kept.id).deleted
    with pytest.raises(openai.BadRequestError):
        sdk.files.delete(used.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(kept.id)
    assert [f.id for f in sdk.files.list()] == [used.id]


@pytest.mark.django_db
def test_a_line_whose_worker_died_on_every_attempt_is_given_up(lane, settings):
    batch, run, _ = lane
    BatchLine.objects.filter(batch_id=batch.id, index=0).update(attempts=settings.GATEWAY_JOB_MAX_ATTEMPTS)

    run()

    line = BatchLine.objects.get(batch_id=batch.id, index=0)
    assert line.status == "failed"
    assert line.error["code"] == "worker_failed"
    assert UsageEvent.objects.get(request_id=f"{batch.id}_0").status == 500
    assert BatchLine.objects.filter(batch_id=batch.id, status="completed").count() == 3


def _lease_lapsed(batch) -> None:
    BatchLine.objects.filter(batch_id=batch.id, status="running").update(
        lease_until=timezone.now() - timedelta(seconds=1))


@pytest.mark.django_db
@pytest.mark.parametrize("stopped_at", [SETTLE, "apps.gateway.batches.line_save"])
def test_a_line_whose_worker_stopped_after_its_ledger_row_settles_its_hold_once(setup, lane_factory, monkeypatch,
                                                                               stopped_at):
    """Stopped before its settle: the next run settles the hold the line kept, with the row's cost
    (before: nothing ended it, and the budget counted it until it expired). Stopped after its
    settle, before its answer was saved: the next run must not add the cost a second time."""
    from apps.gateway import batches

    budget = f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("10"), period="total")
    batch, run, _ = lane_factory(jsonl(setup.alias, 1))
    with monkeypatch.context() as stop:
        stop.setattr(stopped_at, stops_the_worker)
        with pytest.raises(WorkerStopped):
            async_to_sync(batches.lane_run)(batch_id=batch.id)
    cost = usd(micros(UsageEvent.objects.get(batch_id=batch.id).cost))  # as the counters count it
    assert BatchLine.objects.get(batch_id=batch.id).status == "running"
    if stopped_at == SETTLE:
        assert spend(budget)[1] > 0  # the hold its worker did not end
    else:
        assert spend(budget) == (cost, Decimal(0))  # settled before its worker stopped
    _lease_lapsed(batch)

    run()

    batch.refresh_from_db()
    assert (batch.status, batch.completed, batch.failed) == ("completed", 0, 1)
    assert BatchLine.objects.get(batch_id=batch.id).error["code"] == "result_lost"
    assert UsageEvent.objects.filter(batch_id=batch.id).count() == 1
    assert spend(budget) == (cost, Decimal(0))


@pytest.mark.django_db
def test_a_line_given_up_releases_the_hold_an_earlier_attempt_kept(setup, lane_factory, monkeypatch, settings):
    from apps.gateway import batches

    budget = f.BudgetFactory(tenant=setup.tenant, limit_usd=Decimal("10"), period="total")
    batch, run, _ = lane_factory(jsonl(setup.alias, 1))
    with monkeypatch.context() as stop:
        stop.setattr("apps.gateway.pipeline.usage_event_record", stops_the_worker)  # before its row
        with pytest.raises(WorkerStopped):
            async_to_sync(batches.lane_run)(batch_id=batch.id)
    assert spend(budget)[1] > 0  # the stopped attempt's hold
    BatchLine.objects.filter(batch_id=batch.id).update(attempts=settings.GATEWAY_JOB_MAX_ATTEMPTS)
    _lease_lapsed(batch)

    run()

    assert BatchLine.objects.get(batch_id=batch.id).error["code"] == "worker_failed"
    assert UsageEvent.objects.get(batch_id=batch.id).status == 500
    assert spend(budget) == (Decimal(0), Decimal(0))


@pytest.mark.django_db(transaction=True)
def test_lanes_finalizing_together_end_the_batch_once_without_a_database_error(setup, monkeypatch):
    """The last lanes out call batch_finalize at the same moment, each on its own connection. On
    SQLite (the embedded mode) a transaction that read before writing failed at once with
    "database is locked"; every finalize must instead wait its turn, and exactly one ends the batch."""
    import threading

    from django.db import connection

    from apps.gateway import batches, queues, tasks
    from apps.keys.selectors import api_key_auth_by_id

    monkeypatch.setattr(queues, "publish", lambda *a, **k: None)
    monkeypatch.setattr(tasks.batch_lane, "apply_async", lambda *a, **k: None)
    upload = batches.file_create(tenant_id=setup.tenant.id, purpose="batch", filename="in.jsonl",
                                 content=jsonl(setup.alias, 3))
    batch = batches.batch_create(auth=api_key_auth_by_id(key_id=setup.key.id), input_file_id=upload.id,
                                 endpoint="/v1/chat/completions", completion_window="24h", metadata=None)
    batches.batch_start(batch_id=batch.id)
    BatchLine.objects.filter(batch_id=batch.id).update(status="completed", response={"custom_id": "x"})
    connection.close()
    start, results, errors = threading.Barrier(4), [], []

    def finalize():
        try:
            start.wait()
            results.append(batches.batch_finalize(batch_id=batch.id))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=finalize) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sorted(results) == [False, False, False, True]
    assert Batch.objects.get(id=batch.id).status == "completed"


def test_files_and_batches_check_the_keys_endpoint_scope(client, setup):
    chat_only = f.ApiKeyFactory(tenant=setup.tenant, source=setup.source, allowed_endpoints=["/v1/chat/completions"])
    files_too = f.ApiKeyFactory(tenant=setup.tenant, source=setup.source,
                                allowed_endpoints=["/v1/chat/completions", "/v1/files*", "/v1/batches*"])

    refused = client.get("/v1/files", HTTP_AUTHORIZATION=f"Bearer {chat_only.secret}")
    allowed = client.get("/v1/files", HTTP_AUTHORIZATION=f"Bearer {files_too.secret}")

    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "endpoint_not_allowed"
    assert allowed.status_code == 200


@pytest.mark.django_db
def test_a_deeply_nested_or_nul_line_goes_to_the_error_file_and_the_batch_runs(lane_factory):
    """Before: a 1,000-deep line (or one with \\u0000) left the whole batch stuck in `validating`."""
    deep = "[" * 1000 + '"x"' + "]" * 1000
    content = (b'{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
               b'"messages": [{"role": "user", "content": ' + deep.encode() + b'}]}}\n'
               b'{"custom_id": "nul", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
               b'"messages": [{"role": "user", "content": "a\\u0000b"}]}}\n')
    batch, run, _ = lane_factory(content)

    run()

    batch.refresh_from_db()
    assert (batch.status, batch.failed) == ("completed", 2)
    errors = [orjson.loads(x)["response"]["body"]["error"] for x in bytes(batch.error_file.content).splitlines()]
    assert {e["code"] for e in errors} == {"invalid_line"}
    assert any("nested" in e["message"] for e in errors)
    assert any("NUL" in e["message"] for e in errors)
