"""Request logs: what a request sent and got back, with its upstream attempts and timings, for the
tenants that turned them on (`RequestLogPolicy`).

Off the hot path: the pipeline hands over plain values once the ledger row is durable
(`request_log_submit`). In the ASGI server the entries are queued in process and written in bulk by
a background task (one INSERT and one commit per batch, in a thread of its own, never the request's
wait); elsewhere (a Celery worker, the test client) the entry is written right away. Serialising,
redaction and capping happen at write time, in that thread. A log is observability, not the ledger:
an entry still queued when the process dies is lost.

Redaction runs before anything is stored: API-key-like strings (`sk-...`), bearer tokens, the
patterns of REQUEST_LOG_REDACT_PATTERNS and the tenant's own; then each body is capped to
REQUEST_LOG_MAX_BODY_BYTES. Bodies are stored only for a tenant whose policy has `bodies` on.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
from django.conf import settings
from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone

from apps.core.db import db_sync, on_server_loop

from .models import RequestLog, RequestLogPolicy

log = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
BUILTIN_PATTERNS = (
    r"\bsk-[A-Za-z0-9_\-]{8,}",  # OpenAI/Anthropic-style and our own API keys
    r"(?i)(?<=bearer )[A-Za-z0-9._~+/=\-]{8,}",  # bearer tokens (the word "Bearer" is kept)
)
BATCH_MAX = 200


@dataclass(frozen=True, slots=True)
class RequestLogSettings:
    """A tenant's request-log policy, as the pipeline caches it."""

    bodies: bool
    retention_days: int
    redact: tuple[re.Pattern, ...]


def _compiled(extra) -> tuple[re.Pattern, ...]:
    patterns = [*BUILTIN_PATTERNS, *settings.REQUEST_LOG_REDACT_PATTERNS, *(extra or ())]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error:
            log.warning("request log: ignoring the invalid redaction pattern %r", p)
    return tuple(out)


def request_log_settings(*, tenant_id: int) -> RequestLogSettings | None:
    """The tenant's request-log policy, or None when it logs nothing."""
    policy = RequestLogPolicy.objects.filter(tenant_id=tenant_id, enabled=True).first()
    if policy is None:
        return None
    return RequestLogSettings(bodies=policy.bodies, retention_days=policy.retention_days,
                              redact=_compiled(policy.redact_patterns))


def redact(text: str, patterns) -> str:
    for pattern in patterns:
        text = pattern.sub(REDACTED, text)
    return text


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str).decode()


def _capped(text: str, limit: int) -> tuple[str, bool]:
    data = text.encode()
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", errors="ignore"), True


def request_log_row(entry: dict) -> RequestLog:
    """The row of one submitted entry: bodies serialised, redacted, then capped (only with bodies on)."""
    entry = dict(entry)
    policy: RequestLogSettings = entry.pop("policy")
    request, response = entry.pop("request", None), entry.pop("response", None)
    row = RequestLog(**entry)
    if policy.bodies:
        limit = settings.REQUEST_LOG_MAX_BODY_BYTES
        row.request_body, row.request_truncated = _capped(redact(_text(request), policy.redact), limit)
        row.response_body, row.response_truncated = _capped(redact(_text(response), policy.redact), limit)
    return row


def request_logs_write(*, entries: list[dict]) -> int:
    """Insert the entries' rows (idempotent on request_id)."""
    rows = [request_log_row(e) for e in entries]
    RequestLog.objects.bulk_create(rows, ignore_conflicts=True)
    return len(rows)


_pending: list[dict] = []
_drainer: asyncio.Task | None = None
_executor: ThreadPoolExecutor | None = None


def _write_in_thread(entries: list[dict]) -> None:
    close_old_connections()
    request_logs_write(entries=entries)


async def _drain() -> None:
    global _drainer, _executor
    loop = asyncio.get_running_loop()
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-log")
    try:
        while _pending:
            batch = _pending[:BATCH_MAX]
            del _pending[:BATCH_MAX]
            try:
                await loop.run_in_executor(_executor, _write_in_thread, batch)
            except Exception:  # noqa: BLE001 - observability must not fail requests; the loss is logged
                log.exception("request log: %d entries could not be written", len(batch))
    finally:
        _drainer = None


async def request_log_submit(entry: dict) -> None:
    """Hand over one request's log entry (plain values; `policy` is its tenant's settings). In the
    server: queued, written in bulk in the background; elsewhere: written now."""
    global _drainer
    if on_server_loop():
        _pending.append(entry)
        if _drainer is None:
            _drainer = asyncio.get_running_loop().create_task(_drain())
        return
    try:
        await db_sync(request_logs_write, entries=[entry])
    except Exception:  # noqa: BLE001 - as above
        log.exception("request log: the entry of %s could not be written", entry.get("request_id"))


def request_logs_purge(*, now: datetime | None = None) -> int:
    """Delete the logs past their tenant's retention (REQUEST_LOG_DEFAULT_RETENTION_DAYS for a tenant
    without a policy any more). The beat task runs this."""
    now = now or timezone.now()
    deleted = 0
    kept_by_policy = []
    for tenant_id, days in RequestLogPolicy.objects.values_list("tenant_id", "retention_days"):
        kept_by_policy.append(tenant_id)
        deleted += RequestLog.objects.filter(tenant_id=tenant_id, timestamp__lt=now - timedelta(days=days)).delete()[0]
    cutoff = now - timedelta(days=settings.REQUEST_LOG_DEFAULT_RETENTION_DAYS)
    deleted += RequestLog.objects.filter(timestamp__lt=cutoff).exclude(tenant_id__in=kept_by_policy).delete()[0]
    return deleted


# --- reads --------------------------------------------------------------------------------------


def request_logs_query(*, tenant_ids, since: datetime | None = None, until: datetime | None = None,
                       model: str = "", source: str = "", key: str = "", status: int | None = None,
                       budget_id: str = "", tag: str = "", end_user: str = "", q: str = ""):
    """The request logs of `tenant_ids` under the filters, newest first; `q` searches both bodies,
    `tag` matches one of the request's `metadata.tags`, `end_user` its `user`."""
    qs = RequestLog.objects.filter(tenant_id__in=tenant_ids)
    if since is not None:
        qs = qs.filter(timestamp__gte=since)
    if until is not None:
        qs = qs.filter(timestamp__lt=until)
    if model:
        qs = qs.filter(model=model)
    if source:
        qs = qs.filter(source_ref=source)
    if key:
        qs = qs.filter(api_key__name=key)
    if status is not None:
        qs = qs.filter(status=status)
    if budget_id:
        qs = qs.filter(budget_id=budget_id)
    if tag:
        qs = qs.filter(tags__has_tag=tag)
    if end_user:
        qs = qs.filter(end_user=end_user)
    if q:
        qs = qs.filter(Q(request_body__icontains=q) | Q(response_body__icontains=q))
    return qs.select_related("tenant", "api_key").order_by("-timestamp", "-id")


def request_log_get(*, tenant_ids, request_id: str) -> RequestLog | None:
    return (RequestLog.objects.filter(tenant_id__in=tenant_ids, request_id=request_id)
            .select_related("tenant", "api_key").first())


def request_log_dict(row: RequestLog, *, bodies: bool) -> dict:
    """A request log for the API and the dashboard; the bodies (as stored) only with `bodies`."""
    out = {
        "request_id": row.request_id, "timestamp": row.timestamp.isoformat(), "tenant": row.tenant.slug,
        "key": row.api_key.name if row.api_key else None, "source_id": row.source_ref,
        "request_type": row.request_type, "model": row.model, "model_version": row.model_version,
        "provider": row.provider, "status": row.status,
        "error_code": row.error_code, "budget_id": row.budget_id or None, "tags": row.tags,
        "end_user": row.end_user or None, "stream": row.stream,
        "cached": row.cached, "latency_ms": row.latency_ms, "attempts": row.attempts, "timings": row.timings,
    }
    if bodies:
        out.update(request_body=row.request_body, response_body=row.response_body,
                   request_truncated=row.request_truncated, response_truncated=row.response_truncated)
    return out
