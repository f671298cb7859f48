"""Security events of the data plane: bursts of failed authentications.

Failures are counted in fixed windows of GATEWAY_AUTH_FAILURE_WINDOW_S seconds twice: per (key
prefix, client address), and per client address whatever the prefix (so that presenting random
prefixes does not hide a guessing run). When either count of a window reaches
GATEWAY_AUTH_FAILURE_BURST, one audit row (`auth_failure_burst`) is written for it, whatever the
number of failures after it; `details.scope` says which count (`key_prefix` or `client_ip`; when
both reach it on the same failure, one row, `key_prefix`).

With REDIS_URL set the counts live in Redis (INCR, so exactly one instance sees the threshold
reached) and are shared by every instance; without it, or while Redis cannot be reached, they are
counted in this process. The prefix is the key's display prefix when the key is known (revoked,
expired), else the first 6 characters of what was presented: never the secret.
"""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings

from apps.core import caches
from apps.core import redis as shared

from .services import security_event_record

log = logging.getLogger(__name__)

_counts: dict[tuple[str, ...], tuple[int, int, dict[str, int]]] = {}
_lock = threading.Lock()


def _count_local(key: tuple[str, ...], *, window: int, reason: str) -> tuple[int, dict[str, int]]:
    with _lock:
        w, n, reasons = _counts.get(key, (window, 0, {}))
        if w != window:
            n, reasons = 0, {}
        n += 1
        reasons = {**reasons, reason: reasons.get(reason, 0) + 1}
        _counts[key] = (window, n, reasons)
        if len(_counts) > 50_000:
            for k in [k for k, v in _counts.items() if v[0] != window]:
                del _counts[k]
    return n, reasons


async def _count_shared(*, prefix: str, ip: str, window: int, reason: str) -> tuple[int, int, dict[str, int]]:
    """(count of the prefix from this address, count of the address, reasons of the address) in Redis."""
    ttl = settings.GATEWAY_AUTH_FAILURE_WINDOW_S * 2
    base = f"llms:authfail:{{{ip}:{window}}}"  # one hash tag: the transaction's keys share a Cluster slot
    by_prefix, by_ip, reasons_key = f"{base}:p:{ip}:{prefix}", f"{base}:ip:{ip}", f"{base}:why:{ip}"

    async def count():
        pipe = shared.client().pipeline(transaction=True)
        pipe.incr(by_prefix).expire(by_prefix, ttl).incr(by_ip).expire(by_ip, ttl)
        pipe.hincrby(reasons_key, reason, 1).expire(reasons_key, ttl).hgetall(reasons_key)
        return await pipe.execute()

    n_prefix, _, n_ip, _, _, _, reasons = await shared.run(count)
    return int(n_prefix), int(n_ip), {k.decode(): int(v) for k, v in reasons.items()}


async def auth_failure_note(*, prefix: str, ip: str, reason: str, tenant_id: int | None = None,
                            key_id: int | None = None) -> None:
    window_s = settings.GATEWAY_AUTH_FAILURE_WINDOW_S
    window = int(time.time() // window_s)
    counted = None
    if shared.configured():
        try:
            counted = await _count_shared(prefix=prefix, ip=ip, window=window, reason=reason)
        except shared.StateUnavailable as exc:
            log.warning("authentication failures counted in process: Redis unavailable (%s)", exc)
    if counted is None:
        n_prefix, _ = _count_local(("p", ip, prefix), window=window, reason=reason)
        n_ip, reasons = _count_local(("ip", ip), window=window, reason=reason)
    else:
        n_prefix, n_ip, reasons = counted
    burst = settings.GATEWAY_AUTH_FAILURE_BURST
    if n_prefix == burst:
        scope, n = "key_prefix", n_prefix
    elif n_ip == burst:
        scope, n = "client_ip", n_ip
    else:
        return
    log.warning("authentication failure burst: %d failures (by %s) for key prefix %r from %s",
                n, scope, prefix, ip or "?")
    from apps.core.db import db_sync

    if scope == "client_ip":  # failures of many keys, maybe of several tenants: none is named
        tenant_id = key_id = None
    await db_sync(
        security_event_record,
        action="auth_failure_burst", tenant_id=tenant_id, object_id=str(key_id or ""),
        details={"scope": scope, "key_prefix": prefix, "client_ip": ip, "failures": n, "window_s": window_s,
                 "window_start": window * window_s, "reasons": reasons},
    )


def reset() -> None:
    with _lock:
        _counts.clear()


caches.on_reset(reset)
