"""Prometheus metrics of the gateway, fed by the pipeline's record step (`usage_observe`).

Cheap by design: a few labelled counter/histogram increments per request, in process, no I/O.
Budget spend and utilisation are computed when Prometheus scrapes, by a collector billing registers.

Several processes (gunicorn/uvicorn workers, and the Celery workers that run async requests and
batch lines): set PROMETHEUS_MULTIPROC_DIR to one empty, writable folder in the environment of every
one of them (web and worker) before they start; each process writes its samples there and /metrics
merges them all (prometheus_client's multiprocess mode), so a batch line run by a worker is counted
like a request served by the web process. Empty the folder when the whole service restarts. Without
it, /metrics shows the web process's own samples only.
"""

from __future__ import annotations

import os
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)

REQUESTS = Counter("llm_requests_total", "Gateway requests by model alias and HTTP status.",
                   ["model", "status"])
REQUEST_LATENCY = Histogram("llm_request_duration_seconds", "End-to-end gateway latency by model and status.",
                            ["model", "status"], buckets=LATENCY_BUCKETS_S)
TOKENS = Counter("llm_tokens_total", "Tokens by model and kind (prompt, completion).", ["model", "kind"])
COST = Counter("llm_cost_usd_total", "Cost in USD by model (float: for monitoring, not billing).", ["model"])
CACHE_HITS = Counter("llm_cache_hits_total", "Requests answered from the response cache.", ["model"])
SAVED = Counter("llm_cache_saved_usd_total", "USD saved by cache hits.", ["model"])
PROVIDER_ERRORS = Counter("llm_provider_errors_total", "Requests that ended in an upstream error (5xx).",
                          ["provider", "code"])
PROVIDER_LATENCY = Histogram("llm_provider_request_duration_seconds",
                             "Latency of requests served by a provider (not cache hits).", ["provider"],
                             buckets=LATENCY_BUCKETS_S)
ATTEMPTS = Counter("llm_upstream_attempts_total",
                   "Upstream attempts by provider, deployment and outcome (ok, error, timeout, rate_limited, "
                   "cooldown), failed tries a retry or fallback hid included.", ["provider", "deployment", "outcome"])
ATTEMPT_LATENCY = Histogram("llm_upstream_attempt_duration_seconds",
                            "Duration of each upstream attempt (for a stream: to its first chunk).",
                            ["provider", "deployment"], buckets=LATENCY_BUCKETS_S)
LEDGER_JOURNALED = Counter("llm_ledger_journaled_rows_total",
                           "Ledger rows written to the local journal because the database was unavailable.")
LEDGER_JOURNALED_FIRST = Counter("llm_ledger_journaled_first_rows_total",
                                 "Ledger rows journaled before their answer (GATEWAY_LEDGER_WRITER=journal).")
LEDGER_REPLAYED = Counter("llm_ledger_replayed_rows_total", "Journaled ledger rows replayed into the database.")
LEDGER_REJECTED = Counter("llm_ledger_rejected_rows_total",
                          "Journaled ledger rows the database refused on replay (kept under rejected/).")


UNKNOWN_MODEL = "(unknown)"
_children: dict[tuple[str, str], tuple] = {}


def _series(model: str, status: str) -> tuple:
    """The labelled children for (model, status), cached: `labels()` takes a lock each call."""
    found = _children.get((model, status))
    if found is None:
        found = (REQUESTS.labels(model, status), REQUEST_LATENCY.labels(model, status),
                 TOKENS.labels(model, "prompt"), TOKENS.labels(model, "completion"), COST.labels(model))
        _children[(model, status)] = found
    return found


def usage_observe(*, model: str, status: int, latency_ms: int, prompt_tokens: int, completion_tokens: int,
                  cost: Decimal, saved_cost: Decimal, cached: bool, provider: str, error_code: str) -> None:
    """Count one finished request. Called once per ledger row, from the pipeline's record step.
    `model` must be a configured alias (or UNKNOWN_MODEL): a client's arbitrary model names must
    not become label values."""
    requests, latency, prompt, completion, cost_total = _series(model, str(status))
    seconds = latency_ms / 1000
    requests.inc()
    latency.observe(seconds)
    if prompt_tokens:
        prompt.inc(prompt_tokens)
    if completion_tokens:
        completion.inc(completion_tokens)
    if cost:
        cost_total.inc(float(cost))
    if cached:
        CACHE_HITS.labels(model).inc()
        if saved_cost:
            SAVED.labels(model).inc(float(saved_cost))
    elif provider:
        PROVIDER_LATENCY.labels(provider).observe(seconds)
        if status >= 500:
            PROVIDER_ERRORS.labels(provider, error_code or str(status)).inc()


_attempt_children: dict[tuple[str, str, str], tuple] = {}


def attempts_observe(attempts: list[tuple[str, str, str, float]]) -> None:
    """Count a request's upstream attempts: (provider, deployment label, outcome, seconds) each,
    plain values from the gateway. A skipped deployment (cooldown, quota) is counted, not timed."""
    for provider, deployment, outcome, seconds in attempts:
        key = (provider, deployment, outcome)
        found = _attempt_children.get(key)
        if found is None:
            found = _attempt_children[key] = (ATTEMPTS.labels(provider, deployment, outcome),
                                              ATTEMPT_LATENCY.labels(provider, deployment))
        found[0].inc()
        if outcome != "cooldown" and seconds > 0:
            found[1].observe(seconds)


_scrape_collectors: list = []


def scrape_collector_register(factory) -> None:
    """Another app adds gauges computed at scrape time (billing: budget spend and utilisation)."""
    if factory not in _scrape_collectors:
        _scrape_collectors.append(factory)


def metrics_text() -> tuple[bytes, str]:
    """The exposition for /metrics: this process's (or, in multiprocess mode, every worker's)
    samples plus budget gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY  # this process's metrics, plus process/platform/gc collectors
    scraped = CollectorRegistry()
    for factory in _scrape_collectors:
        scraped.register(factory())
    return generate_latest(registry) + generate_latest(scraped), CONTENT_TYPE_LATEST
