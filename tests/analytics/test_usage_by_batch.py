"""The ledger grouped by the seed's batch_id."""

from decimal import Decimal

import pytest

from apps.analytics.selectors import usage_by_batch
from tests import factories as f

pytestmark = pytest.mark.django_db


def test_requests_carrying_a_batch_id_are_summed_per_batch_and_tenant():
    acme, other = f.TenantFactory(), f.TenantFactory()
    for status in (200, 200, 402):
        f.UsageEventFactory(tenant=acme, batch_id="nightly", status=status, cost=Decimal("0.5"))
    f.UsageEventFactory(tenant=acme, batch_id="weekly")
    f.UsageEventFactory(tenant=acme, batch_id="")
    f.UsageEventFactory(tenant=other, batch_id="nightly")

    rows = {r["batch_id"]: r for r in usage_by_batch(tenant_ids=[acme.id])}

    assert set(rows) == {"nightly", "weekly"}
    nightly = rows["nightly"]
    assert (nightly["requests"], nightly["failed"]) == (3, 1)
    assert nightly["cost"] == Decimal("1.5")
    assert nightly["prompt_tokens"] == 30
    assert [r["batch_id"] for r in usage_by_batch(tenant_ids=[acme.id], batch_id="weekly")] == ["weekly"]



def test_the_batches_page_reads_rows_with_a_batch_id_by_index():
    """The batches page must not read every ledger row of the tenant in the range (millions a month)
    to find the few that carry a batch id: its condition is a range the batch_id index answers.
    Before, `batch_id <> ''` read all the tenant's rows (docs/ledger-at-scale.md)."""
    from django.db import connection

    from apps.analytics.models import UsageEvent

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL query plans")
    acme = f.TenantFactory()
    f.UsageEventFactory(tenant=acme, batch_id="nightly")
    plain = f.UsageEventFactory(tenant=acme, batch_id="")
    cols = [fld.column for fld in UsageEvent._meta.concrete_fields if fld.column not in ("id", "request_id")]
    with connection.cursor() as cur:  # a ledger of 5,000 requests of which one carries a batch id
        cur.execute(f"INSERT INTO analytics_usageevent (request_id, {', '.join(cols)}) "  # noqa: S608
                    f"SELECT 'r' || g, {', '.join('e.' + c for c in cols)} FROM analytics_usageevent e, "
                    "generate_series(1, 5000) g WHERE e.id = %s", [plain.id])
        cur.execute("ANALYZE analytics_usageevent")
    captured = []

    def capture(execute, sql, params, many, context):
        captured.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(capture):
        rows = usage_by_batch(tenant_ids=[acme.id])
    assert [(r["batch_id"], r["requests"]) for r in rows] == [("nightly", 1)]
    with connection.cursor() as cur:
        cur.execute("EXPLAIN " + captured[-1][0], captured[-1][1])
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert "batch_id_idx" in plan, plan
