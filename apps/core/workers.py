"""Which Celery queues have a consumer, and which have work waiting with none.

Every worker writes a heartbeat (its name, the queues it consumes, the time) every
CELERY_WORKER_HEARTBEAT_S seconds from a thread started at `worker_ready` (config/celery.py):
to a Redis hash when REDIS_URL is set (shared by every host), else to a file under
var/celery/workers/ (the embedded default: one host). Reading it is one HGETALL or one directory
listing, cheap enough for /readyz, the dashboard and the async 202 response (cached a few seconds
in process there).

Waiting work is read from the broker: the length of a queue's lists (Redis, every priority step)
or the message files of the filesystem broker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from django.conf import settings

from . import caches

log = logging.getLogger(__name__)

HEARTBEAT_KEY = "llms:workers:heartbeat"
_REDIS_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport names priority lists "<queue><sep><step>"


def all_queues() -> list[str]:
    return list(settings.CELERY_QUEUE_NAMES)


def _stale_after() -> float:
    return settings.CELERY_WORKER_HEARTBEAT_S * 3


def _folder() -> Path:
    return Path(settings.VAR_DIR) / "celery" / "workers"


def _redis():
    from . import redis

    return redis.sync_client()


def heartbeat_write(*, name: str, queues: list[str]) -> None:
    record = json.dumps({"name": name, "queues": sorted(queues), "at": time.time()})
    if settings.REDIS_URL:
        _redis().hset(HEARTBEAT_KEY, name, record)
        return
    folder = _folder()
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
    partial = folder / f".{safe}.partial"
    partial.write_text(record)
    partial.replace(folder / f"{safe}.json")


def heartbeat_remove(*, name: str) -> None:
    if settings.REDIS_URL:
        _redis().hdel(HEARTBEAT_KEY, name)
        return
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
    (_folder() / f"{safe}.json").unlink(missing_ok=True)


def workers_seen() -> list[dict]:
    """Workers whose last heartbeat is recent: [{"name", "queues", "at"}]."""
    if settings.REDIS_URL:
        raw = list(_redis().hgetall(HEARTBEAT_KEY).values())
    else:
        folder = _folder()
        raw = []
        for f in folder.glob("*.json") if folder.exists() else ():
            try:
                raw.append(f.read_text())
            except OSError:
                continue
    oldest = time.time() - _stale_after()
    seen = []
    for item in raw:
        try:
            record = json.loads(item)
        except ValueError:
            continue
        if record.get("at", 0) >= oldest:
            seen.append(record)
    return seen


def queue_depths() -> dict[str, int]:
    """Messages waiting in each of our queues (not counting those a worker already took)."""
    broker = settings.CELERY_BROKER_URL
    names = all_queues()
    if broker.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(broker, socket_timeout=settings.REDIS_TIMEOUT_S,
                                      socket_connect_timeout=settings.REDIS_TIMEOUT_S)
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
            for step in range(1, 10):
                pipe.llen(f"{name}{_REDIS_PRIORITY_SEP}{step}")
        lengths = pipe.execute()
        return {name: sum(lengths[i * 10:(i + 1) * 10]) for i, name in enumerate(names)}
    if broker.startswith("filesystem://"):
        folder = Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])
        depths = dict.fromkeys(names, 0)
        for f in folder.glob("*.msg"):
            queue = f.name.rsplit(".", 2)[-2] if f.name.count(".") >= 2 else ""
            if queue in depths:
                depths[queue] += 1
        return depths
    return {}


def queue_report() -> dict:
    """{"workers": n, "queues": {name: {"waiting", "consumers"}}, "unconsumed": [names with work
    waiting and no recent consumer]}. Errors reading the broker are reported, not raised."""
    try:
        seen = workers_seen()
    except Exception as exc:  # noqa: BLE001 - reported
        return {"error": f"heartbeats: {type(exc).__name__}", "unconsumed": []}
    try:
        depths = queue_depths()
    except Exception as exc:  # noqa: BLE001 - reported
        depths = {}
        error = f"broker: {type(exc).__name__}"
    else:
        error = None
    queues = {}
    for name in all_queues():
        consumers = sum(1 for w in seen if name in w.get("queues", ()))
        queues[name] = {"waiting": depths.get(name), "consumers": consumers}
    report = {"workers": len(seen), "queues": queues,
              "unconsumed": [n for n, q in queues.items() if q["waiting"] and not q["consumers"]]}
    if error:
        report["error"] = error
    return report


_seen_cache: dict[str, tuple[float, bool]] = {}


def consumer_seen_cached(queue: str, *, cache_s: float = 5.0) -> bool | None:
    """The cached answer of `consumer_seen`, or None when there is none this fresh (no I/O)."""
    cached = _seen_cache.get(queue)
    if cached and time.monotonic() - cached[0] < cache_s:
        return cached[1]
    return None


def consumer_seen(queue: str, *, cache_s: float = 5.0) -> bool:
    """Has a worker consuming `queue` sent a heartbeat recently? Cached `cache_s` in process; a
    failure to read counts as seen (the 202 then says nothing rather than something false)."""
    now = time.monotonic()
    cached = _seen_cache.get(queue)
    if cached and now - cached[0] < cache_s:
        return cached[1]
    try:
        seen = any(queue in w.get("queues", ()) for w in workers_seen())
    except Exception:  # noqa: BLE001 - the answer is advisory
        log.warning("could not read worker heartbeats", exc_info=True)
        seen = True
    _seen_cache[queue] = (now, seen)
    return seen


@caches.on_reset
def _reset() -> None:
    _seen_cache.clear()


# --- the worker side (config/celery.py) ----------------------------------------------------------

_stop = threading.Event()


def heartbeat_start(*, name: str, queues: list[str]) -> threading.Thread:
    """Write the heartbeat now and then every CELERY_WORKER_HEARTBEAT_S in a daemon thread."""
    _stop.clear()

    def beat():
        while True:
            try:
                heartbeat_write(name=name, queues=queues)
            except Exception:  # noqa: BLE001 - next beat retries; readers see a stale worker meanwhile
                log.warning("worker heartbeat not written", exc_info=True)
            if _stop.wait(settings.CELERY_WORKER_HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="llms-worker-heartbeat", daemon=True)
    thread.start()
    return thread


def heartbeat_stop(*, name: str) -> None:
    _stop.set()
    try:
        heartbeat_remove(name=name)
    except Exception:  # noqa: BLE001 - it goes stale on its own
        log.warning("worker heartbeat not removed", exc_info=True)
