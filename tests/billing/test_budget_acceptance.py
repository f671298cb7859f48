"""Issue 4's "done when", as a new user would try it: a $1 monthly hard budget on a source, hammered
by concurrent requests (plain and streamed) through two gateway processes on PostgreSQL and Redis,
with a real Celery worker delivering the alerts by signed webhook and by email."""

from __future__ import annotations

import asyncio
import email
from decimal import Decimal
from pathlib import Path

import httpx
import orjson

from apps.analytics.models import UsageEvent
from apps.billing.models import Alert
from apps.keys.outbound import signature_verify
from apps.keys.services import tenant_webhook_secret
from tests import factories as f
from tests.conftest import make_setup, requires_shared_state
from tests.gateway.worker import Worker, broker_reset, wait_for

pytestmark = requires_shared_state


async def _fire(urls: list[str], secret: str, body: dict, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        return await asyncio.gather(*[
            client.post(f"{urls[i % len(urls)]}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                        json={**body, "stream": True, "stream_options": {"include_usage": True}} if i % 2 else body)
            for i in range(n)
        ])


def _mails(folder: Path) -> list[email.message.Message]:
    out = []
    for path in folder.glob("*.log"):
        # The filebased backend writes each message followed by a line of 79 dashes.
        for raw in path.read_text().split("-" * 79):
            if raw.strip():
                out.append(email.message_from_string(raw.strip()))
    return out


def test_a_one_dollar_source_budget_holds_under_two_instances_and_alerts_once(gateway_instances, upstream, webhook,
                                                                               tmp_path):
    f.PriceFactory(model="gpt-dollar", input_usd_per_mtok=Decimal("1000"), output_usd_per_mtok=Decimal("2000"))
    s = make_setup(upstream, alias="gpt-dollar")  # "hi" costs 6 prompt + 2 completion tokens = $0.01
    budget = f.BudgetFactory(tenant=s.tenant, name="team-dollar", scope="source", scope_value=s.source.name,
                             limit_usd=Decimal("1"), period="monthly", enforcement="hard", alert_thresholds=[0.8],
                             alert_emails=["ops@example.com"], alert_webhook_url=webhook.url)
    mail_dir = tmp_path / "mail"
    broker_reset()
    worker = Worker(EMAIL_BACKEND="django.core.mail.backends.filebased.EmailBackend",
                    EMAIL_FILE_PATH=str(mail_dir)).start()
    try:
        urls = gateway_instances(2)
        body = {"model": s.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        answers = asyncio.run(_fire(urls, s.secret, body, 160))
        for i in range(200):  # then one at a time until refused: the budget is then full within one hold
            answers.append(httpx.post(f"{urls[i % 2]}/v1/chat/completions", json=body, timeout=30,
                                      headers={"Authorization": f"Bearer {s.secret}"}))
            if answers[-1].status_code == 402:
                break

        ok = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 402]
        assert len(ok) + len(refused) == len(answers)
        assert answers[-1].status_code == 402
        rows = UsageEvent.objects.filter(status=200)
        assert {a.headers["x-request-id"] for a in ok} == set(rows.values_list("request_id", flat=True))
        assert rows.count() == len(ok)
        spent = sum(r.cost for r in rows)
        assert spent <= Decimal("1")
        from apps.billing.selectors import price_for_model
        from apps.billing.services import cost_upper_bound
        from apps.gateway.tokens import prompt_bytes

        one_hold = cost_upper_bound(price=price_for_model(model=s.alias, at=rows.first().timestamp),
                                    prompt_tokens_max=prompt_bytes(body["messages"]), completion_tokens_max=5)
        assert spent >= Decimal("1") - one_hold  # full to within one request's hold
        # a streamed request costs exactly what the plain one costs
        assert {r.cost for r in rows} == {Decimal("0.01")}
        assert rows.filter(stream=True).exists() and rows.filter(stream=False).exists()

        # the 402 names the budget and when it resets
        error = refused[-1].json()["error"]
        assert error["code"] == "budget_exceeded"
        assert "team-dollar" in error["message"] and "resets at" in error["message"]
        assert refused[-1].headers["x-gateway-budget"] == "team-dollar"

        # GET /v1/budget shows the state
        status = httpx.get(f"{urls[0]}/v1/budget", headers={"Authorization": f"Bearer {s.secret}"}).json()["data"]
        (state,) = [b for b in status if b["name"] == "team-dollar"]
        assert Decimal(state["spent_usd"]) == spent
        assert Decimal(state["held_usd"]) == 0
        assert Decimal(state["remaining_usd"]) == Decimal("1") - spent
        assert state["resets_at"] and state["scope"] == "source"

        # the 80% alert arrived exactly once by webhook (signed) and by email
        def delivered():
            alert = Alert.objects.filter(budget=budget, kind="threshold").first()
            return alert if alert and alert.delivery.get("email") == "sent" and \
                alert.delivery.get("webhook") == "sent" else None

        alert = wait_for(delivered, timeout=60, what="the 80% alert to be delivered")
        assert Alert.objects.filter(budget=budget, kind="threshold").count() == 1
        assert alert.threshold == Decimal("0.8")
        hooks = []
        secret = tenant_webhook_secret(tenant_id=s.tenant.pk)
        for r in webhook.requests:
            assert signature_verify(header=r["headers"]["x-llm-signature"], body=r["body"], secret=secret)
            hooks.append(orjson.loads(r["body"])["alert"])
        assert [h["threshold"] for h in hooks if h["kind"] == "threshold"] == ["0.8"]
        mails = [m for m in _mails(mail_dir) if "Threshold" in m["Subject"]]
        assert len(mails) == 1
        assert mails[0]["To"] == "ops@example.com"
    except Exception:
        print(worker.tail())
        raise
    finally:
        worker.stop()
        worker.cleanup()
