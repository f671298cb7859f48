"""The one CSV writer of the product (ledger exports, aggregated summaries, `usage_export`).

Text cells hold client-controlled strings (batch_id, budget_id, source ids, key names, models...).
A spreadsheet opening the file runs a cell starting with `=`, `+`, `-`, `@`, tab or CR as a
formula (CSV injection), so such a text cell is written with a leading single quote (OWASP's
rule). Numeric columns are written as they are: our numbers are never negative, but a number
must stay a number."""

from __future__ import annotations

import csv

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value):
    """`value` made inert for a spreadsheet if it is a string that starts a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


class SafeCsvWriter:
    """csv.writer for rows of `columns`: every cell outside `numeric_columns` goes through
    `csv_text`. `writerow` returns what the underlying writer returns (the line, for an echo
    stream)."""

    def __init__(self, stream, *, columns, numeric_columns=(), **fmtparams):
        self._writer = csv.writer(stream, **fmtparams)
        self._numeric = frozenset(i for i, c in enumerate(columns) if c in set(numeric_columns))

    def writerow(self, row):
        return self._writer.writerow([v if i in self._numeric else csv_text(v) for i, v in enumerate(row)])
