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

from . import tracing
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
    kind: str = ""  # the provider adapter (openai, anthropic, ...), for traces

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
                   upstream_model=deployment.target.upstream_model, outcome=outcome, start=now, end=now, error=error,
                   kind=deployment.target.kind)


# --- the end of a request: its log and its trace ------------------------------------------------


def tracing_on() -> bool:
    return tracing.ENABLED


def with_error(sent, exc: BaseException, status: int, code: str):
    """The response as sent, once the request failed: the error body, after the chunks a stream
    had already sent."""
    from .errors import GatewayError

    if isinstance(exc, GatewayError):
        body = exc.body()
    else:
        body = {"error": {"message": "The gateway failed to answer this request." if status == 500 else code,
                          "type": "api_error", "param": None, "code": code}}
    if isinstance(sent, list):
        return [*sent, body]
    return body


def assemble_stream(chunks: list[dict]) -> dict:
    """A stream's chunks as the one chat.completion they stand for (content, tool calls, finish
    reasons and usage per choice); an error event a failed stream ended with is kept as `error`."""
    head: dict = {}
    choices: dict[int, dict] = {}
    out: dict = {}
    for chunk in chunks:
        if "error" in chunk and "choices" not in chunk:
            out["error"] = chunk["error"]
            continue
        if not head:
            head = chunk
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for c in chunk.get("choices") or ():
            idx = c.get("index", 0)
            choice = choices.setdefault(idx, {"index": idx, "message": {"role": "assistant", "content": ""},
                                              "finish_reason": None})
            delta = c.get("delta") or {}
            message = choice["message"]
            if delta.get("role"):
                message["role"] = delta["role"]
            if delta.get("content"):
                message["content"] += delta["content"]
            for call in delta.get("tool_calls") or ():
                calls = message.setdefault("tool_calls", {})
                got = calls.setdefault(call.get("index", 0), {"id": "", "type": "function",
                                                              "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    got["id"] = call["id"]
                fn = call.get("function") or {}
                got["function"]["name"] += fn.get("name") or ""
                got["function"]["arguments"] += fn.get("arguments") or ""
            if c.get("finish_reason"):
                choice["finish_reason"] = c["finish_reason"]
    for choice in choices.values():
        if "tool_calls" in choice["message"]:
            choice["message"]["tool_calls"] = [v for _k, v in sorted(choice["message"]["tool_calls"].items())]
    body = {"id": head.get("id"), "object": "chat.completion", "created": head.get("created"),
            "model": head.get("model"), "choices": [choices[k] for k in sorted(choices)]}
    body.update(out)
    return body


def _timings(ctx, latency_ms: int) -> dict:
    out = {"total_ms": latency_ms}
    for name, (start, end) in ctx.marks.items():
        out[f"{name}_ms"] = round((end - start) * 1000, 3)
    called = [a for a in ctx.attempt_log if a.end > a.start]
    if called:
        out["upstream_ms"] = round((called[-1].end - called[0].start) * 1000, 3)
    return out


async def finished(ctx, attempts: list[dict], latency_ms: int) -> None:
    """Once the ledger row is durable: hand the request log over (when the tenant logs requests)
    and emit the trace (when tracing is on). Only called for a watched request (`ctx.watch`)."""
    if ctx.log is not None:
        from apps.analytics.request_logs import request_log_submit

        d = ctx.deployment
        response = ctx.response_body
        if isinstance(response, list):
            response = assemble_stream(response)
        await request_log_submit({
            "policy": ctx.log, "request_id": ctx.request_id, "tenant_id": ctx.auth.tenant_id,
            "timestamp": ctx.timestamp, "api_key_id": ctx.auth.key_id,
            "source_ref": ctx.source_name or ctx.auth.source_name, "request_type": ctx.kind,
            "model": ctx.model, "model_version": ctx.model_version, "provider": d.provider_name if d else "",
            "status": ctx.status,
            "error_code": ctx.error_code, "budget_id": ctx.budget_id,
            "tags": ctx.request.tags if ctx.request is not None else [],
            "end_user": ctx.request.end_user if ctx.request is not None else "",
            "stream": ctx.stream, "cached": ctx.cached,
            "latency_ms": latency_ms, "attempts": attempts, "timings": _timings(ctx, latency_ms),
            "request": ctx.raw_body, "response": response,
        })
    if tracing.ENABLED:
        tracing.request_spans(ctx, attempts)
