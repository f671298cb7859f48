"""Health endpoints (dashboards and exports come with the analytics work)."""

from __future__ import annotations

from django.conf import settings
from django.db import connection
from django.http import JsonResponse


def healthz(request):
    return JsonResponse({"status": "ok"})


def readyz(request):
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        checks["database"] = f"error: {type(exc).__name__}"
    if settings.REDIS_URL:
        import redis

        try:
            redis.Redis.from_url(settings.REDIS_URL, socket_timeout=settings.REDIS_TIMEOUT_S,
                                 socket_connect_timeout=settings.REDIS_TIMEOUT_S).ping()
            checks["redis"] = "ok"
        except redis.RedisError as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if ok else "unavailable", "checks": checks}
    if checks["database"] == "ok":  # upstream availability is reported, not a readiness condition
        from apps.gateway.selectors import deployment_health

        health = deployment_health()
        body["deployments"] = {"total": len(health), "up": sum(h.ok is True for h in health),
                               "down": sum(h.ok is False for h in health),
                               "unprobed": sum(h.ok is None for h in health)}
    return JsonResponse(body, status=200 if ok else 503)
