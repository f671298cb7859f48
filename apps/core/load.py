"""How many requests this process is serving right now, counted where every /v1 request enters
(config/asgi.py), whichever path serves it. A settle after its answer asks it: with other requests
in flight, their Redis commands go out within a moment and the settle rides with them
(apps.core.redis `unhurried`); alone, it goes at once, while the answer is on its way, instead of
ahead of the next request's admission in the same pipeline, where that admission would wait for it."""

_serving = 0


def started() -> None:
    global _serving
    _serving += 1


def finished() -> None:
    global _serving
    _serving -= 1


def serving() -> int:
    return _serving
