"""What happened to a request: its upstream attempts and the timings of its steps.

The call loop (router.call_with_fallbacks) appends one `Attempt` per upstream try to the request
context, failed ones a fallback hid included; a deployment skipped because it is cooling down or at
its own quota is an attempt with outcome `cooldown` or `rate_limited` and no latency. A cache hit
has no attempt. Recording is a list append and two perf_counter reads, no I/O: the attempts go to
Prometheus, the ledger row (`attempts`), the request log and the trace once, when the request ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .providers.base import ProviderError

OK = "ok"
ERROR = "error"
TIMEOUT = "timeout"
RATE_LIMITED = "rate_limited"
COOLDOWN = "cooldown"
OUTCOMES = (OK, ERROR, TIMEOUT, RATE_LIMITED, COOLDOWN)


@dataclass(slots=True)
class Attempt:
    deployment_id: int
    provider: str
    upstream_model: str
    outcome: str
    start: float  # perf_counter when the try began
    end: float
    status: int | None = None  # the upstream's HTTP status, when it answered
    error: str = ""  # the error class (ProviderError.code), when it failed
    stream: bool = False

    @property
    def latency_ms(self) -> float:
        return round((self.end - self.start) * 1000, 3)

    @property
    def deployment_label(self) -> str:
        """The Prometheus `deployment` label: bounded by configuration, readable."""
        return f"{self.deployment_id}:{self.upstream_model}"

    def as_dict(self, started: float) -> dict:
        """Plain values for the ledger row and the request log (`start_ms` from the request's start;
        `ttfb_ms`, for a stream, is the time to its first chunk)."""
        out = {"deployment_id": self.deployment_id, "provider": self.provider, "model": self.upstream_model,
               "outcome": self.outcome, "status": self.status, "error": self.error,
               "start_ms": round((self.start - started) * 1000, 3), "latency_ms": self.latency_ms}
        if self.stream and self.outcome == OK:
            out["ttfb_ms"] = self.latency_ms
        return out


def outcome_of(exc: BaseException) -> tuple[str, int | None, str]:
    """(outcome, upstream status, error class) of a failed try."""
    if isinstance(exc, TimeoutError):
        return TIMEOUT, None, "upstream_deadline_exceeded"
    if isinstance(exc, ProviderError):
        status = exc.upstream_status
        if exc.code == "upstream_timeout":
            return TIMEOUT, None, exc.code
        if exc.status == 429 or exc.upstream_status == 429:
            return RATE_LIMITED, 429, exc.code
        return ERROR, status, exc.code
    if isinstance(exc, asyncio.CancelledError):
        return ERROR, None, "client_disconnected"
    return ERROR, None, type(exc).__name__


def skipped(deployment, outcome: str, error: str) -> Attempt:
    """A deployment passed over without a call (cooling down, or at its own quota)."""
    now = time.perf_counter()
    return Attempt(deployment_id=deployment.id, provider=deployment.provider_name,
                   upstream_model=deployment.target.upstream_model, outcome=outcome, start=now, end=now, error=error)
