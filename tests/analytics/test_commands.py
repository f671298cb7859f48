import io
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db.models import Sum
from django.utils import timezone

from apps.analytics import tasks
from apps.analytics.models import UsageEvent, UsageRollupDaily, UsageRollupHourly
from tests import factories as f

pytestmark = pytest.mark.django_db


def test_usage_generate_builds_a_ledger_and_its_rollups():
    out = io.StringIO()
    call_command("usage_generate", events=600, days=2, tenant="synthetic", stdout=out)
    assert UsageEvent.objects.filter(tenant__slug="synthetic").count() == 600
    assert UsageRollupHourly.objects.aggregate(n=Sum("requests"))["n"] == 600
    assert UsageRollupDaily.objects.aggregate(n=Sum("requests"))["n"] == 600
    # exact on PostgreSQL; SQLite sums decimals as floats
    assert float(UsageEvent.objects.filter(status=200).aggregate(c=Sum("cost"))["c"]) == pytest.approx(
        float(UsageRollupDaily.objects.aggregate(c=Sum("cost"))["c"]), abs=1e-9)
    bench = io.StringIO()
    call_command("analytics_bench", tenant="synthetic", repeat=1, days=2, stdout=bench)
    assert "/dashboard/usage.csv  600 rows" in bench.getvalue()


def test_beat_task_recomputes_recent_buckets():
    assert settings.CELERY_BEAT_SCHEDULE["analytics-rollup-recent"]["task"] == tasks.usage_rollup_recent.name
    f.UsageEventFactory(timestamp=timezone.now() - timedelta(minutes=5))
    tasks.usage_rollup_recent()
    tasks.usage_rollup_recent()
    assert UsageRollupHourly.objects.aggregate(n=Sum("requests"))["n"] == 1


def test_analytics_rollup_command_backfills():
    f.UsageEventFactory(timestamp=timezone.now() - timedelta(days=10))
    call_command("analytics_rollup", stdout=io.StringIO())
    assert not UsageRollupDaily.objects.exists()
    since = (timezone.now() - timedelta(days=11)).date().isoformat()
    call_command("analytics_rollup", since=since, stdout=io.StringIO())
    assert UsageRollupDaily.objects.aggregate(n=Sum("requests"))["n"] == 1
