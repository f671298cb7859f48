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
