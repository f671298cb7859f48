"""On the ASGI server's loop a budget settle finishes after the answer: the client has its answer
(and the journal, then the ledger, its row) while the hold still counts the request at its upper
bound; the settle then swaps it for the cost, once the ledger has the row. The server's lifespan
shutdown waits for settles still running."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import orjson
import pytest
from django.conf import settings
from django.utils import timezone

from apps.analytics.models import UsageEvent
from apps.analytics.services import ledger_writes_drain
from apps.billing import budgets
from apps.billing.models import Budget
from apps.billing.selectors import budget_ref
from apps.core import db, load
from apps.core import redis as core_redis
from apps.core.state import LimitCell
from config.asgi import application
from tests import factories as f
from tests.conftest import make_setup

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slow_settle(monkeypatch):
    """Settles wait for `gate` before reaching the shared state."""
    gate = asyncio.Event()
    real_close = budgets._close

    async def gated_close(hold, **kw):
        await gate.wait()
        await real_close(hold, **kw)

    monkeypatch.setattr(budgets, "_close", gated_close)
    return gate


async def call(secret: str, body: dict) -> tuple[int, dict]:
    """One POST through config.asgi.application, as a server drives it; returns once the last
    byte of the answer is sent."""
    raw = orjson.dumps(body)
    sent: list[dict] = []
    answered = asyncio.Event()

    async def receive():
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client stays

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {secret}".encode())]}
    app = asyncio.ensure_future(application(scope, receive, send))
    await asyncio.wait([app, asyncio.ensure_future(answered.wait())], return_when=asyncio.FIRST_COMPLETED)
    start = next(m for m in sent[1:] if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent[1:] if m["type"] == "http.response.body")
    await app
    return start["status"], orjson.loads(body)


async def spend(budget) -> tuple[Decimal, Decimal]:
    ref = await asyncio.to_thread(lambda: budget_ref(Budget.objects.select_related("tenant").get(pk=budget.pk)))
    out = (await budgets.budget_spend(budgets=[ref], at=timezone.now()))[ref.id]
    return out


async def test_the_answer_and_its_row_come_before_the_settle_which_then_lands(server_loop, upstream, slow_settle):
    setup = await asyncio.to_thread(make_setup, upstream)
    budget = await asyncio.to_thread(f.BudgetFactory, tenant=setup.tenant, limit_usd=Decimal("5"), period="total")
    body = {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}

    status, answer = await call(setup.secret, body)

    assert status == 200 and answer["choices"]
    await ledger_writes_drain()  # the row, journaled before the answer, is committed after it
    row = await UsageEvent.objects.aget()
    assert row.status == 200 and row.cost > 0
    spent, held = await spend(budget)
    assert held > row.cost and spent == 0  # the hold still counts the request, at its upper bound
    assert budgets.open_holds() == []  # ended (its one exit taken), only not landed yet

    slow_settle.set()
    await budgets.settles_drain()

    assert await spend(budget) == (row.cost, Decimal(0))


async def test_the_lifespan_shutdown_waits_for_the_settles_still_running(server_loop, upstream, slow_settle):
    setup = await asyncio.to_thread(make_setup, upstream)
    budget = await asyncio.to_thread(f.BudgetFactory, tenant=setup.tenant, limit_usd=Decimal("5"), period="total")
    body = {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    status, _answer = await call(setup.secret, body)
    assert status == 200

    messages = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        messages.put_nowait({"type": kind})
    replies: list[str] = []

    async def send(message):
        replies.append(message["type"])

    lifespan = asyncio.ensure_future(application({"type": "lifespan", "asgi": {"version": "3.0"}},
                                                 messages.get, send))
    for _ in range(50):  # loop turns, not time: far more than startup and shutdown take without a settle
        await asyncio.sleep(0)
    assert replies == ["lifespan.startup.complete"] and not lifespan.done()

    slow_settle.set()
    await lifespan

    assert replies == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    row = await UsageEvent.objects.aget()
    assert await spend(budget) == (row.cost, Decimal(0))


async def test_out_of_the_server_loop_a_settle_lands_before_it_returns(monkeypatch):
    """A worker's or a test client's short-lived loop: nothing may be left running after it."""
    monkeypatch.setattr(db, "_server_loop", None)
    landed = []

    async def close(hold, **kw):
        landed.append((hold.request_id, kw["actual_micros"]))

    monkeypatch.setattr(budgets, "_close", close)
    hold = budgets.Hold(request_id="r1", limits=[LimitCell(key="k:rpm", limit=10, cost=1, kind="requests")])

    await hold.settle(cost_usd=Decimal("0.01"), tokens=10)

    assert landed == [("r1", 10_000)] and hold.ended == "settled"


@pytest.mark.skipif(not settings.REDIS_URL, reason="the pipeline the settle rides in is Redis's")
async def test_a_lone_requests_settle_goes_at_once_and_one_among_others_rides_with_their_commands(
        server_loop, upstream, monkeypatch):
    """Alone, a settle that waited for company would go out ahead of the next request's admission
    in one pipeline, and that admission would wait for it (2026-11-28: 0.2-0.3 ms at one in flight).
    With other requests in flight, their commands come within a moment: it goes with them."""
    monkeypatch.setattr(core_redis, "UNHURRIED_S", 3600)  # a settle waiting for company waits for one
    setup = await asyncio.to_thread(make_setup, upstream)
    budget = await asyncio.to_thread(f.BudgetFactory, tenant=setup.tenant, limit_usd=Decimal("5"), period="total")
    body = {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}

    assert (await call(setup.secret, body))[0] == 200  # alone
    await ledger_writes_drain()  # the settle waits for the row to be in the ledger
    settling = set(budgets._settling)
    assert settling
    await asyncio.wait(settling, timeout=10)  # sending nothing meanwhile
    assert all(task.done() for task in settling)
    assert (await spend(budget))[1] == 0

    load.started()  # another request in flight
    try:
        assert (await call(setup.secret, body))[0] == 200
        await ledger_writes_drain()
        for _ in range(50):  # loop turns, not time
            await asyncio.sleep(0)
        assert budgets._settling and not any(task.done() for task in budgets._settling)  # waiting for company
        await core_redis.run(lambda: core_redis.send("PING"))  # the other request's command
        await asyncio.wait_for(budgets.settles_drain(), 10)
    finally:
        load.finished()

    rows = [row async for row in UsageEvent.objects.all()]
    assert await spend(budget) == (sum(r.cost for r in rows), Decimal(0))


@pytest.mark.parametrize("direct_routes", [True, False])
async def test_a_request_is_counted_in_flight_on_either_data_plane_path(server_loop, upstream, settings,
                                                                        direct_routes):
    """The settle's choice (alone or with company) reads how many requests are in flight: every
    /v1 request counts, whether the lean direct route serves it or Django's data-plane handler."""
    settings.GATEWAY_DIRECT_ROUTES = direct_routes
    setup = await asyncio.to_thread(make_setup, upstream)
    seen: list[int] = []
    upstream.before_answer = lambda _body: seen.append(load.serving())

    status, _ = await call(setup.secret, {"model": setup.alias, "messages": [{"role": "user", "content": "hi"}]})

    assert status == 200
    assert seen == [1]  # while the upstream answered
    assert load.serving() == 0  # after the answer


async def test_a_settle_waits_until_its_row_journaled_first_is_in_the_ledger(server_loop, monkeypatch):
    """The row was made durable in the local journal before the answer (the default ledger writer)
    and reaches the ledger after it: the hold must count the request until the ledger does."""
    landed = []

    async def close(hold, **kw):
        landed.append((hold.request_id, kw["actual_micros"]))

    monkeypatch.setattr(budgets, "_close", close)
    hold = budgets.Hold(request_id="r1", limits=[LimitCell(key="k:rpm", limit=10, cost=1, kind="requests")])
    in_ledger = asyncio.get_running_loop().create_future()

    await hold.settle(cost_usd=Decimal("0.01"), tokens=10, after=in_ledger)
    for _ in range(50):  # loop turns, not time
        await asyncio.sleep(0)
    assert landed == [] and hold.ended == "settled"

    in_ledger.set_result(None)
    await asyncio.wait_for(budgets.settles_drain(), 10)
    assert landed == [("r1", 10_000)]



@pytest.mark.skipif(not settings.REDIS_URL, reason="a new server is Redis's (the embedded state has one file)")
@pytest.mark.parametrize("state", ["open", "settled, its row on its way to the ledger"])
async def test_a_new_redis_server_gets_back_the_holds_whose_cost_the_ledger_does_not_have(server_loop, state):
    """The Redis server fails over to one that never had this process's hold (a replica promoted
    before it got it), with the request still running, or answered with its row journaled first
    and its settle waiting for the ledger. Until the row is in the ledger, the budget counters
    (rebuilt from the ledger) plus the holds put back must still count the request; then its
    settle turns the hold into the cost."""
    budget = await asyncio.to_thread(f.BudgetFactory, limit_usd=Decimal("1"))
    ref = await asyncio.to_thread(lambda: budget_ref(Budget.objects.select_related("tenant").get(pk=budget.pk)))
    hold = await budgets.hold_take(request_id="req_failover1", budgets=[ref], amount_usd=Decimal("0.01"),
                                   at=timezone.now(), ttl_s=60)
    in_ledger = asyncio.get_running_loop().create_future()
    if state != "open":
        await hold.settle(cost_usd=Decimal("0.004"), tokens=10, after=in_ledger)

    client = core_redis.client()
    cell = hold.budgets[0].cell.key
    await client.delete(*(f"{cell}:{part}" for part in ("spent", "held", "holds", "amounts")))
    core_redis._known_run_ids[""] = "the-server-before"  # this process was on another server
    await client.connection_pool.disconnect()

    assert await spend(budget) == (Decimal(0), Decimal("0.01"))  # not in the ledger: the hold counts it

    await asyncio.to_thread(f.UsageEventFactory, request_id="req_failover1", tenant=budget.tenant,
                            cost=Decimal("0.004"))
    if state == "open":
        await hold.settle(cost_usd=Decimal("0.004"), tokens=10)
    in_ledger.set_result(None)
    await asyncio.wait_for(budgets.settles_drain(), 10)
    assert await spend(budget) == (Decimal("0.004"), Decimal(0))
