"""Retention and archive of the ledger (filled in below)."""

from __future__ import annotations

from . import partitions


def ledger_upkeep() -> dict:
    return {"created": partitions.partitions_ensure()}
