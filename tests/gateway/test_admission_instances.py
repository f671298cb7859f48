"""Admission across gateway instances: two uvicorn processes sharing PostgreSQL and Redis."""

import asyncio
from decimal import Decimal

import httpx

from apps.analytics.models import UsageEvent
from tests import factories as f
from tests.conftest import make_setup, requires_shared_state

pytestmark = requires_shared_state


async def _fire(urls: list[str], secret: str, body: dict, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(*[
            client.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {secret}"})
            for i in range(n)
        ])


def test_rpm_is_exact_across_two_instances(gateway_instances, upstream):
    s = make_setup(upstream, rpm=20)
    urls = gateway_instances(2)

    answers = asyncio.run(_fire(urls, s.secret, {"model": s.alias, "messages": [{"role": "user", "content": "x"}]},
                                60))

    ok = [a for a in answers if a.status_code == 200]
    assert not [a for a in answers if "x-gateway-admission" in a.headers]  # every answer went through Redis
    assert len(ok) == 20
    assert {a.status_code for a in answers} == {200, 429}
    assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in ok) == list(range(20))
    assert all(a.headers["retry-after"] for a in answers if a.status_code == 429)


def test_hard_budget_is_never_overspent_under_concurrency(gateway_instances, upstream):
    s = make_setup(upstream)
    limit = Decimal("0.0005")
    f.BudgetFactory(tenant=s.tenant, name="small", limit_usd=limit, period="monthly")
    urls = gateway_instances(2)
    body = {"model": s.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}

    # 120 at once across both instances, then one at a time until the budget refuses: with
    # nothing else in flight, that refusal means the budget is full to within one hold.
    answers = asyncio.run(_fire(urls, s.secret, body, 120))
    for i in range(300):
        answers.append(httpx.post(f"{urls[i % 2]}/v1/chat/completions", json=body, timeout=30,
                                  headers={"Authorization": f"Bearer {s.secret}"}))
        if answers[-1].status_code == 402:
            break

    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 402]
    assert len(ok) + len(refused) == len(answers) and refused
    assert answers[-1].status_code == 402
    rows = UsageEvent.objects.filter(status=200)
    assert rows.count() == len(ok)
    assert {a.headers["x-request-id"] for a in ok} == set(rows.values_list("request_id", flat=True))
    spent = sum(r.cost for r in rows)
    # one request's hold: prompt bytes at the input price plus max_tokens at the output price
    from apps.billing.selectors import price_for_model
    from apps.billing.services import cost_upper_bound
    from apps.gateway.tokens import prompt_bytes

    price = price_for_model(model=s.alias, at=rows.first().timestamp)
    one_hold = cost_upper_bound(price=price, prompt_tokens_max=prompt_bytes(body["messages"]),
                                completion_tokens_max=50)
    assert spent <= limit
    assert spent >= limit - one_hold
