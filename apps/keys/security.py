"""Security events of the data plane: bursts of failed authentications.

Failures are counted in process per (key prefix, client address) in fixed windows of
GATEWAY_AUTH_FAILURE_WINDOW_S seconds; when a window's count reaches GATEWAY_AUTH_FAILURE_BURST, one
audit row (`auth_failure_burst`) is written for that window, whatever the number of failures after
it. The prefix is the key's display prefix when the key is known (revoked, expired), else the first
6 characters of what was presented: never the secret.
"""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings

from .services import security_event_record

log = logging.getLogger(__name__)

_counts: dict[tuple[str, str], tuple[int, int, dict[str, int]]] = {}
_lock = threading.Lock()


def failure_count(*, prefix: str, ip: str) -> int:
    window = int(time.time() // settings.GATEWAY_AUTH_FAILURE_WINDOW_S)
    entry = _counts.get((prefix, ip))
    return entry[1] if entry and entry[0] == window else 0


async def auth_failure_note(*, prefix: str, ip: str, reason: str, tenant_id: int | None = None,
                            key_id: int | None = None) -> None:
    window_s = settings.GATEWAY_AUTH_FAILURE_WINDOW_S
    window = int(time.time() // window_s)
    with _lock:
        w, n, reasons = _counts.get((prefix, ip), (window, 0, {}))
        if w != window:
            n, reasons = 0, {}
        n += 1
        reasons[reason] = reasons.get(reason, 0) + 1
        _counts[(prefix, ip)] = (window, n, reasons)
        if len(_counts) > 50_000:
            for k in [k for k, v in _counts.items() if v[0] != window]:
                del _counts[k]
    if n != settings.GATEWAY_AUTH_FAILURE_BURST:
        return
    log.warning("authentication failure burst: %d failures for key prefix %r from %s", n, prefix, ip or "?")
    from apps.core.db import db_sync

    await db_sync(
        security_event_record,
        action="auth_failure_burst", tenant_id=tenant_id, object_id=str(key_id or ""),
        details={"key_prefix": prefix, "client_ip": ip, "failures": n, "window_s": window_s,
                 "window_start": window * window_s, "reasons": dict(reasons)},
    )


def reset() -> None:
    with _lock:
        _counts.clear()
