"""A client that goes away mid-stream: the hold is settled (not left to expire), the ledger row bills
what was produced, and the budget shows it."""

from decimal import Decimal

import httpx
import pytest

from apps.analytics.models import UsageEvent
from tests import factories as f
from tests.conftest import make_setup
from tests.gateway.worker import wait_for


def test_a_stream_the_client_drops_is_settled_for_what_was_produced(live_gateway, upstream):
    s = make_setup(upstream, upstream_model="drip-100", tpm=100_000)
    f.BudgetFactory(tenant=s.tenant, name="month", limit_usd=Decimal("10"))
    words = " ".join(f"w{i}" for i in range(40))
    body = {"model": s.alias, "messages": [{"role": "user", "content": words}], "max_tokens": 100, "stream": True}
    headers = {"Authorization": f"Bearer {s.secret}"}

    with httpx.Client(timeout=30) as client, client.stream("POST", f"{live_gateway}/v1/chat/completions",
                                                            json=body, headers=headers) as resp:
        assert resp.status_code == 200
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                seen += 1
                if seen == 2:
                    break  # leave mid-stream: the connection is closed

    row = wait_for(lambda: UsageEvent.objects.filter(status=499).first(), timeout=20,
                   what="the interrupted stream's ledger row")
    assert row.error_code == "client_disconnected"
    assert row.estimated and row.stream
    assert 0 < row.completion_tokens < 41
    assert row.cost > 0
    (budget,) = httpx.get(f"{live_gateway}/v1/budget", headers=headers).json()["data"]
    assert Decimal(budget["held_usd"]) == 0  # settled, not left to expire
    assert Decimal(budget["spent_usd"]) == row.cost


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_before_the_answer_gets_its_hold_released(live_gateway, upstream, stream):
    s = make_setup(upstream, upstream_model="slow-3000", tpm=100_000)
    f.BudgetFactory(tenant=s.tenant, name="month", limit_usd=Decimal("10"))
    headers = {"Authorization": f"Bearer {s.secret}"}
    body = {"model": s.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": stream}

    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the upstream still thinks
        httpx.post(f"{live_gateway}/v1/chat/completions", json=body, headers=headers, timeout=0.5)

    row = wait_for(lambda: UsageEvent.objects.filter(status=499).first(), timeout=20,
                   what="the abandoned request's ledger row")
    assert row.error_code == "client_disconnected"
    assert row.cost == 0
    (budget,) = httpx.get(f"{live_gateway}/v1/budget", headers=headers).json()["data"]
    assert Decimal(budget["held_usd"]) == 0  # released at once, not after GATEWAY_HOLD_TTL_S
