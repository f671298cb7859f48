"""Small shared timestamps ("the rollups were last computed at ..."): written by one process (the
worker's beat), read by another (the web's dashboard). In a Redis hash when REDIS_URL is set, else
in a file under var/stamps/ (the embedded default: one host)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)
KEY = "llms:stamps"


def _file(name: str) -> Path:
    return Path(settings.VAR_DIR) / "stamps" / f"{name}.txt"


def stamp_write(name: str, at: datetime) -> None:
    """Record `at` under `name` unless a later time is recorded already. Failures are logged."""
    value = at.timestamp()
    try:
        if settings.REDIS_URL:
            from .redis import sync_client

            client = sync_client()
            current = client.hget(KEY, name)
            if current is None or float(current) < value:
                client.hset(KEY, name, repr(value))
            return
        path = _file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and float(path.read_text() or 0) >= value:
            return
        partial = path.with_suffix(".partial")
        partial.write_text(repr(value))
        partial.replace(path)
    except Exception:  # noqa: BLE001 - a stamp is informational
        log.warning("could not record stamp %s", name, exc_info=True)


def stamp_read(name: str) -> datetime | None:
    try:
        if settings.REDIS_URL:
            from .redis import sync_client

            raw = sync_client().hget(KEY, name)
        else:
            path = _file(name)
            raw = path.read_text() if path.exists() else None
    except Exception:  # noqa: BLE001 - a stamp is informational
        log.warning("could not read stamp %s", name, exc_info=True)
        return None
    return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None
