"""Batches sent to the provider's own batch API (OpenAI Batch API, Anthropic Message Batches), as a
user runs them: upload a JSONL file to /v1/files, create /v1/batches with the OpenAI SDK, a real
Celery worker admits each line, submits, polls, downloads and maps the results back; the fakes in
tests/fakes/ speak each provider's batch wire format on loopback."""

from __future__ import annotations

import io
from dataclasses import dataclass
from decimal import Decimal

import openai
import orjson
import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone

from apps.analytics.models import UsageEvent
from apps.billing.genai import genai_price_lookup
from apps.gateway import provider_batches
from apps.gateway.models import BatchLine, UpstreamBatch
from tests import factories as f
from tests.conftest import make_setup
from tests.gateway.worker import Worker, broker_reset, until_done, wait_for
from tests.money import spend

POLL_S = "0.2"


@dataclass
class Case:
    kind: str
    fake: object
    setup: object
    sdk: openai.OpenAI
    fail_alias: str


@pytest.fixture(params=["openai", "anthropic"])
def case(request, live_gateway, upstream, anthropic_upstream) -> Case:
    """A tenant whose alias routes to a deployment with `provider_batch` on the provider's fake, and
    a second alias whose upstream fails each request (`fail-400`) inside the provider's batch.
    OpenAI's alias is priced from genai-prices (its batch price is half); Anthropic's from the price
    table, which names no batch discount (the provider's documented half applies)."""
    kind = request.param
    fake = upstream if kind == "openai" else anthropic_upstream
    fake.batches.clear()
    fake.batch_cancels.clear()
    fake.batch_hold = False
    model = "gpt-4o-mini" if kind == "openai" else "claude-sonnet-4-5"
    setup = make_setup(fake, kind=kind, upstream_model=model)
    setup.deployment.provider_batch = True
    setup.deployment.save()
    if kind == "openai":
        found = genai_price_lookup(refs=[(model, "openai")], at=timezone.now())
        assert found.batch_discount == Decimal("0.5")
        setup.price.input_usd_per_mtok, setup.price.output_usd_per_mtok = found.input_usd_per_mtok, \
            found.output_usd_per_mtok
        setup.price.batch_discount, setup.price.source = found.batch_discount, "genai-prices"
        setup.price.save()
    failing = make_setup(fake, alias="gpt-failing", upstream_model="fail-400", kind=kind, tenant=setup.tenant)
    failing.deployment.provider_batch = True
    failing.deployment.save()
    sdk = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=setup.secret, max_retries=0)
    yield Case(kind=kind, fake=fake, setup=setup, sdk=sdk, fail_alias="gpt-failing")
    fake.batch_hold = False


@pytest.fixture
def worker(live_gateway):
    broker_reset()
    w = Worker(GATEWAY_PROVIDER_BATCH_POLL_S=POLL_S).start()
    yield w
    w.stop()
    print(w.tail())
    w.cleanup()


def line(i: int, alias: str, content: str | None = None, **body) -> bytes:
    return orjson.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": alias, "messages": [{"role": "user", "content": content or f"question {i}"}],
                                  "max_tokens": 20, **body}})


def submit(sdk, lines: list[bytes]):
    uploaded = sdk.files.create(file=("in.jsonl", io.BytesIO(b"\n".join(lines) + b"\n")), purpose="batch")
    return sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def read_jsonl(sdk, file_id) -> list[dict]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in sdk.files.content(file_id).content.splitlines() if x.strip()]


def submitted_lines(case: Case) -> list[dict]:
    """What the provider's batch API received, in its own wire format: [{custom_id, body}]."""
    out = []
    for batch in case.fake.batches.values():
        if case.kind == "openai":
            out += [{"custom_id": x["custom_id"], "body": x["body"], "url": x["url"]} for x in batch["_lines"]]
        else:
            out += [{"custom_id": r["custom_id"], "body": r["params"]} for r in batch["_requests"]]
    return out


def chat_calls(case: Case) -> int:
    path = "/v1/chat/completions" if case.kind == "openai" else "/v1/messages"
    return sum(1 for r in case.fake.requests if r["path"] == path)


def test_batch_through_the_provider_batch_api_costs_half_with_line_errors_in_the_error_file(case, worker):
    lifetime = f.BudgetFactory(tenant=case.setup.tenant, name="lifetime", limit_usd=Decimal("100"), period="total")
    lines = [line(i, case.setup.alias) for i in range(6)]
    lines.append(line(6, case.fail_alias))  # the provider fails it inside its batch
    lines.append(orjson.dumps({"custom_id": "q7", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": case.setup.alias}}))  # refused by the gateway: no messages
    batch = submit(case.sdk, lines)

    done = until_done(case.sdk, batch.id, worker)

    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 6, 2)
    out = read_jsonl(case.sdk, done.output_file_id)
    assert [o["custom_id"] for o in out] == [f"q{i}" for i in range(6)]
    assert out[2]["response"]["status_code"] == 200
    assert out[2]["response"]["body"]["choices"][0]["message"]["content"] == "Echo: question 2"
    errors = {e["custom_id"]: e for e in read_jsonl(case.sdk, done.error_file_id)}
    assert set(errors) == {"q6", "q7"}
    assert errors["q6"]["response"]["status_code"] == 400
    assert "fake" in errors["q6"]["response"]["body"]["error"]["message"]
    assert errors["q7"]["response"]["body"]["error"]["param"] == "messages"
    # The provider's batch API ran the seven admitted lines, one batch per deployment; no line was
    # called one by one.
    sent = submitted_lines(case)
    assert sorted(x["custom_id"] for x in sent) == [f"line-{i}" for i in range(7)]
    assert len(case.fake.batches) == 2
    assert chat_calls(case) == 0
    assert UpstreamBatch.objects.filter(batch_id=batch.id, status="ended").count() == 2

    # The same request made synchronously, for its price: each batch line cost half of it.
    case.sdk.chat.completions.create(model=case.setup.alias, messages=[{"role": "user", "content": "question 2"}],
                                     max_tokens=20)
    sync = UsageEvent.objects.get(tenant=case.setup.tenant, batch_id="", status=200)
    row = UsageEvent.objects.get(request_id=f"{batch.id}_2")
    assert (row.prompt_tokens, row.completion_tokens) == (sync.prompt_tokens, sync.completion_tokens)
    assert row.cost > 0
    assert abs(sync.cost - 2 * row.cost) <= Decimal("0.0000000001")
    assert row.is_async and row.batch_id == batch.id and row.provider == case.setup.provider.name
    events = UsageEvent.objects.filter(batch_id=batch.id)
    assert events.count() == 8  # every line once: six billed, the provider's error, the gateway's refusal
    assert set(events.values_list("status", flat=True)) == {200, 400}
    assert events.get(request_id=f"{batch.id}_6").cost == 0
    spent, held = spend(lifetime)
    assert held == 0
    assert spent >= sum(events.values_list("cost", flat=True)) + sync.cost
    # Another tenant's key sees neither the batch nor its files.
    outsider = make_setup(case.fake, kind=case.kind, upstream_model="other")
    other = openai.OpenAI(base_url=case.sdk.base_url, api_key=outsider.secret, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)


def test_a_line_a_budget_refuses_goes_to_the_error_file_and_is_never_submitted(case, worker):
    # A line holds its full (sync) upper bound: at least 20 completion tokens (12 or 40 micro-dollars
    # at these prices) plus its prompt bytes: a few lines fit, ten do not.
    limit = Decimal("0.00005") if case.kind == "openai" else Decimal("0.0004")
    f.BudgetFactory(tenant=case.setup.tenant, limit_usd=limit, period="total", enforcement="hard")
    batch = submit(case.sdk, [line(i, case.setup.alias) for i in range(10)])

    done = until_done(case.sdk, batch.id, worker)

    assert done.status == "completed"
    admitted = done.request_counts.completed
    assert 0 < admitted < 10
    assert done.request_counts.failed == 10 - admitted
    refused = read_jsonl(case.sdk, done.error_file_id)
    assert {e["response"]["body"]["error"]["code"] for e in refused} == {"budget_exceeded"}
    assert len(submitted_lines(case)) == admitted  # refused lines never reached the provider
    assert sum(e.cost for e in UsageEvent.objects.filter(batch_id=batch.id)) <= limit


def test_results_processed_twice_bill_each_line_once(case, worker):
    lifetime = f.BudgetFactory(tenant=case.setup.tenant, name="lifetime", limit_usd=Decimal("100"), period="total")
    batch = submit(case.sdk, [line(i, case.setup.alias) for i in range(4)])
    done = until_done(case.sdk, batch.id, worker)
    assert done.status == "completed"
    ledger = sorted(UsageEvent.objects.filter(batch_id=batch.id).values_list("request_id", "cost"))
    spent_before, _ = spend(lifetime)
    upstream = UpstreamBatch.objects.get(batch_id=batch.id)

    # As if a worker had stopped after billing the lines and before saving them: the download is
    # processed again.
    BatchLine.objects.filter(batch_id=batch.id).update(status="submitted", lease_until=None)
    UpstreamBatch.objects.filter(pk=upstream.pk).update(status="submitted")
    step, _, _ = async_to_sync(provider_batches.upstream_step)(upstream_pk=upstream.pk, token=upstream.polls)

    assert step == "ended"
    assert sorted(UsageEvent.objects.filter(batch_id=batch.id).values_list("request_id", "cost")) == ledger
    spent_after, held = spend(lifetime)
    assert (spent_after, held) == (spent_before, 0)
    assert set(BatchLine.objects.filter(batch_id=batch.id).values_list("status", flat=True)) == {"completed"}


def test_cancel_of_a_batch_is_sent_to_the_provider_and_releases_every_line(case, worker):
    lifetime = f.BudgetFactory(tenant=case.setup.tenant, name="lifetime", limit_usd=Decimal("100"), period="total")
    case.fake.batch_hold = True  # the provider keeps the batch in progress
    batch = submit(case.sdk, [line(i, case.setup.alias) for i in range(5)])
    wait_for(lambda: UpstreamBatch.objects.filter(batch_id=batch.id, status="submitted").exists(),
             what="the batch to reach the provider")
    upstream = UpstreamBatch.objects.get(batch_id=batch.id)
    assert spend(lifetime)[1] > 0  # every line holds its budget while the provider runs it

    assert case.sdk.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = until_done(case.sdk, batch.id, worker)

    assert done.status == "cancelled"
    assert case.fake.batch_cancels == [upstream.upstream_id]
    cancelled = read_jsonl(case.sdk, done.error_file_id)
    assert sorted(e["custom_id"] for e in cancelled) == [f"q{i}" for i in range(5)]
    assert {(e["error"] or {}).get("code") for e in cancelled} == {"batch_cancelled"}, cancelled
    assert not UsageEvent.objects.filter(batch_id=batch.id).exists()  # never ran, never billed
    assert spend(lifetime) == (0, 0)


@pytest.mark.parametrize("case", ["openai"], indirect=True)
def test_polling_survives_a_worker_restart(case, live_gateway):
    case.fake.batch_hold = True
    broker_reset()
    first = Worker(GATEWAY_PROVIDER_BATCH_POLL_S=POLL_S).start()
    try:
        batch = submit(case.sdk, [line(i, case.setup.alias) for i in range(3)])
        wait_for(lambda: UpstreamBatch.objects.filter(batch_id=batch.id, status="submitted", polls__gte=2).exists(),
                 what="the provider batch to be polled")
        first.kill()
    finally:
        first.stop()
    case.fake.batch_hold = False
    second = Worker(GATEWAY_PROVIDER_BATCH_POLL_S=POLL_S).start()
    try:
        done = until_done(case.sdk, batch.id, second)
    finally:
        second.stop()
        first.cleanup()
        second.cleanup()

    assert done.status == "completed"
    assert [o["custom_id"] for o in read_jsonl(case.sdk, done.output_file_id)] == ["q0", "q1", "q2"]
    assert len(case.fake.batches) == 1  # submitted once
    assert UsageEvent.objects.filter(batch_id=batch.id, status=200).count() == 3


# --- the adapters' result parsers, on the providers' documented shapes ----------------------------


def test_openai_batch_lines_map_to_results():
    from apps.gateway.providers.openai import batch_line_result

    ok = batch_line_result({"id": "batch_req_1", "custom_id": "line-0", "error": None, "response": {
        "status_code": 200, "request_id": "req_1", "body": {"id": "chatcmpl-1", "object": "chat.completion",
                                                            "choices": [], "usage": {"prompt_tokens": 10,
                                                                                     "completion_tokens": 4,
                                                                                     "total_tokens": 14}}}})
    assert (ok.outcome, ok.completion.usage.prompt_tokens, ok.completion.usage.batch_priced) == ("succeeded", 10, True)
    failed = batch_line_result({"custom_id": "line-1", "error": None, "response": {
        "status_code": 429, "request_id": "req_2", "body": {"error": {"message": "slow down", "type": "tokens",
                                                                      "code": "rate_limit_exceeded"}}}})
    assert (failed.outcome, failed.status, failed.code) == ("errored", 429, "rate_limit_exceeded")
    expired = batch_line_result({"custom_id": "line-2", "response": None,
                                 "error": {"code": "batch_expired", "message": "not completed in time"}})
    assert expired.outcome == "expired"


def test_anthropic_batch_results_map_to_results():
    from apps.gateway.providers.anthropic import batch_item_result

    ok = batch_item_result({"custom_id": "line-0", "result": {"type": "succeeded", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 2, "cache_read_input_tokens": 3,
                  "cache_creation_input_tokens": 0}}}})
    assert (ok.outcome, ok.completion.usage.prompt_tokens, ok.completion.usage.cached_tokens) == ("succeeded", 10, 3)
    assert ok.completion.usage.batch_priced
    errored = batch_item_result({"custom_id": "line-1", "result": {"type": "errored", "error": {
        "type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}}})
    assert (errored.outcome, errored.status, errored.message) == ("errored", 400, "max_tokens: Field required")
    assert batch_item_result({"custom_id": "line-2", "result": {"type": "expired"}}).outcome == "expired"
    assert batch_item_result({"custom_id": "line-3", "result": {"type": "canceled"}}).outcome == "canceled"
