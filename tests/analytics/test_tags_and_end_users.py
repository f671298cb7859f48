"""Tags and end users in the read surfaces: dashboard, CSVs, /api/ usage and analytics, request
logs. Filters and group-by, each tenant seeing only its own (another tenant uses the same tag and
end-user names on purpose)."""

import csv
import io
import time
from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from apps.analytics.models import RequestLog, RequestLogPolicy, UsageDimRollupDaily, UsageDimRollupHourly
from apps.analytics.selectors import CSV_COLUMNS
from apps.analytics.services import usage_rollup_recompute
from apps.keys.models import Role
from tests import factories as f
from tests.conftest import make_setup
from tests.keys.personas import member

pytestmark = pytest.mark.django_db


@pytest.fixture
def tagged(world):
    """acme: alice's two support+eu requests ($0.25 each), bob's one support request ($1), an
    untagged anonymous one ($2); globex: the same tag and end-user names ($99)."""
    now = timezone.now()
    common = {"tenant": world.acme, "api_key": world.acme_key, "source": world.acme_source, "source_ref": "acme-bot",
              "model": "gpt-4o-mini"}
    for i in range(2):
        f.UsageEventFactory(**common, cost=Decimal("0.25"), timestamp=now - timedelta(minutes=i),
                            tags=["support", "eu"], end_user="alice", latency_ms=120)
    f.UsageEventFactory(**common, cost=Decimal("1"), timestamp=now - timedelta(minutes=3), tags=["support"],
                        end_user="bob", status=502)
    f.UsageEventFactory(**common, cost=Decimal("2"), timestamp=now - timedelta(minutes=4))
    f.UsageEventFactory(tenant=world.globex, api_key=world.globex_key, source_ref="globex-etl", model="secret-model",
                        cost=Decimal("99"), timestamp=now, tags=["support"], end_user="alice")
    usage_rollup_recompute(since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    return world


def _csv(resp):
    return list(csv.reader(io.StringIO(b"".join(resp.streaming_content).decode())))


def _api(user) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


def test_tag_and_end_user_rollups_count_each_tag_and_leave_untagged_rows_out(tagged):
    hourly = UsageDimRollupHourly.objects.filter(tenant=tagged.acme)
    sums = {}
    for r in UsageDimRollupDaily.objects.filter(tenant=tagged.acme):  # one row per status class too
        requests, cost = sums.get((r.dim, r.value), (0, Decimal(0)))
        sums[(r.dim, r.value)] = (requests + r.requests, cost + r.cost)

    assert sums == {("tag", "support"): (3, Decimal("1.5")), ("tag", "eu"): (2, Decimal("0.5")),
                    ("user", "alice"): (2, Decimal("0.5")), ("user", "bob"): (1, Decimal("1"))}
    assert sum(r.requests for r in hourly.filter(dim="tag", value="support")) == 3
    assert sum(r.errors for r in hourly.filter(dim="user", value="bob")) == 1
    assert sum(r.lat_le_200 for r in hourly.filter(dim="user", value="alice")) == 2


def test_dashboard_filters_by_tag_and_by_end_user(client, tagged):
    client.force_login(tagged.acme_manager)

    everything = client.get("/dashboard/").context["data"]
    support = client.get("/dashboard/", {"tag": "support"}).context["data"]
    alice = client.get("/dashboard/", {"user": "alice"}).context["data"]

    assert everything["totals"]["cost"] == Decimal("3.5")
    assert (support["totals"]["requests"], support["totals"]["cost"]) == (3, Decimal("1.5"))
    assert support["totals"]["errors"] == 1
    assert (alice["totals"]["requests"], alice["totals"]["cost"]) == (2, Decimal("0.5"))
    assert alice["totals"]["latency_p50_ms"] is not None
    assert [r["label"] for r in support["breakdowns"]["model"]] == ["gpt-4o-mini"]
    assert sum(Decimal(str(p["cost"])) for p in alice["series"]) == Decimal("0.5")


def test_dashboard_groups_by_tag_and_by_end_user(client, tagged):
    client.force_login(tagged.acme_manager)

    resp = client.get("/dashboard/")

    data = resp.context["data"]["breakdowns"]
    assert [(r["label"], r["requests"], r["cost"]) for r in data["tag"]] == [
        ("support", 3, Decimal("1.5")), ("eu", 2, Decimal("0.5"))]
    assert [(r["label"], r["cost"]) for r in data["end_user"]] == [("bob", Decimal("1")), ("alice", Decimal("0.5"))]
    page = resp.content.decode()
    assert 'id="by-tag"' in page and 'id="by-end-user"' in page and "tag=support" in page
    assert "secret-model" not in page and "99" not in page.split('id="by-tag"')[1].split("</table>")[0]


def test_a_tag_and_an_end_user_filter_together_are_refused(client, tagged):
    client.force_login(tagged.acme_manager)

    assert client.get("/dashboard/", {"tag": "support", "user": "alice"}).status_code == 400
    assert _api(tagged.acme_manager).get("/api/analytics/dashboard/", {"tag": "a", "user": "b"}).status_code == 400


def test_another_tenant_sees_only_its_own_tag_and_end_user_figures(client, tagged):
    client.force_login(tagged.globex_manager)

    support = client.get("/dashboard/", {"tag": "support"}).context["data"]
    api = _api(tagged.globex_manager)
    by_user = api.get("/api/analytics/aggregate/", {"group": "end_user"}).json()["rows"]
    csv_rows = _csv(client.get("/dashboard/usage.csv", {"user": "alice"}))

    assert (support["totals"]["requests"], support["totals"]["cost"]) == (1, Decimal("99"))
    assert [(r["tenant"], r["end_user"], r["cost"]) for r in by_user] == [("globex", "alice", "99")]
    assert [r[2] for r in csv_rows[1:]] == ["globex"]
    assert api.get("/api/usage-events/", {"tag": "eu"}).json()["results"] == []


def test_usage_csv_has_tags_and_end_user_columns_and_filters(client, tagged):
    client.force_login(tagged.acme_manager)

    support = _csv(client.get("/dashboard/usage.csv", {"tag": "support"}))
    bob = _csv(client.get("/dashboard/usage.csv", {"user": "bob"}))

    assert support[0] == CSV_COLUMNS and CSV_COLUMNS[-2:] == ["tags", "end_user"]
    assert sorted((r[-2], r[-1]) for r in support[1:]) == [("support", "bob"), ("support;eu", "alice"),
                                                           ("support;eu", "alice")]
    assert [(r[-2], r[-1], r[10]) for r in bob[1:]] == [("support", "bob", "1.0000000000")]


def test_summary_csv_and_aggregate_api_group_by_tag_and_end_user(client, tagged):
    client.force_login(tagged.acme_manager)

    per_tag = _csv(client.get("/dashboard/usage-summary.csv", {"group": "tag"}))
    per_user = _api(tagged.acme_manager).get("/api/analytics/aggregate/", {"group": "end_user"}).json()["rows"]
    eu_only = _api(tagged.acme_manager).get("/api/analytics/aggregate/", {"group": "tag", "tag": "eu"}).json()["rows"]

    assert per_tag[0][:3] == ["tenant", "tag", "requests"]
    assert {(r[1], r[2]) for r in per_tag[1:]} == {("eu", "2"), ("support", "3")}
    assert {(r["end_user"], r["requests"], r["cost"]) for r in per_user} == {("alice", 2, "0.5"), ("bob", 1, "1")}
    assert [r["tag"] for r in eu_only] == ["eu"]


def test_usage_events_api_filters_by_tag_and_user_and_shows_them(tagged):
    api = _api(tagged.acme_manager)

    eu = api.get("/api/usage-events/", {"tag": "eu"}).json()["results"]
    bob = api.get("/api/usage-events/", {"user": "bob"}).json()["results"]
    dashboard = api.get("/api/analytics/dashboard/", {"user": "alice"}).json()

    assert len(eu) == 2
    assert {tuple(e["tags"]) for e in eu} == {("support", "eu")}
    assert {e["end_user"] for e in eu} == {"alice"}
    assert [e["usage_event"]["cost"] for e in bob] == ["1.0000000000"]
    assert dashboard["totals"]["requests"] == 2 and dashboard["filters"]["user"] == "alice"


def _wait_for_log(request_id: str) -> RequestLog:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = RequestLog.objects.filter(request_id=request_id).first()
        if row is not None:
            return row
        time.sleep(0.02)
    raise AssertionError(f"no request log for {request_id}")


def test_request_logs_record_and_filter_tags_and_end_user_per_tenant(live_gateway, upstream):
    s = make_setup(upstream)
    RequestLogPolicy.objects.create(tenant=s.tenant, bodies=False, retention_days=7)
    manager = member(s.tenant, Role.MANAGER, "mo-manager")
    outsider = member(f.TenantFactory(slug="other-co"), Role.MANAGER, "oz-manager")
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=s.secret, max_retries=0)
    ids = {}
    for user, tags in (("alice", ["support", "eu"]), ("bob", ["sales"])):
        resp = client.chat.completions.with_raw_response.create(
            model=s.alias, messages=[{"role": "user", "content": "hi"}], user=user,
            extra_body={"metadata": {"tags": tags}})
        ids[user] = resp.headers["x-request-id"]
    for rid in ids.values():
        _wait_for_log(rid)
    api = _api(manager)

    support = api.get("/api/request-logs/", {"tag": "support"}).json()["results"]
    bob = api.get("/api/request-logs/", {"user": "bob"}).json()["results"]
    one = api.get(f"/api/request-logs/{ids['alice']}/").json()

    assert [(r["request_id"], r["tags"], r["end_user"]) for r in support] == [
        (ids["alice"], ["support", "eu"], "alice")]
    assert [r["request_id"] for r in bob] == [ids["bob"]]
    assert (one["tags"], one["end_user"]) == (["support", "eu"], "alice")
    assert api.get("/api/request-logs/", {"tag": "nope"}).json()["results"] == []
    assert _api(outsider).get("/api/request-logs/", {"tag": "support"}).json()["results"] == []
    assert _api(outsider).get(f"/api/request-logs/{ids['alice']}/").status_code == 404
