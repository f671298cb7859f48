"""The response cache: exact match, always scoped to the tenant.

Key: (tenant, endpoint kind, model alias (or alias@version when pinned), canonical messages/input,
generation parameters), hashed with SHA-256. `stream`, `stream_options` and `user` are not part of
the key, so a streamed request hits what a non-streamed one stored and the other way round.

Policy (`cacheable`): a request's own `cache: true|false` wins; otherwise the key's default (or the
tenant's when the key has none) applies, and then only to deterministic requests (temperature 0,
and embeddings). TTL: the key's `cache_ttl_s`, else the tenant's.

Backends: Redis when REDIS_URL is set (short timeouts; any Redis error is a miss and never fails the
request), an in-process LRU otherwise. Entries larger than GATEWAY_CACHE_MAX_ENTRY_BYTES are not
stored. Completions that call tools, or were cut short by a filter, are not stored: the SSE replay
only reproduces plain text.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import fields
from typing import TYPE_CHECKING

import orjson
from django.conf import settings

from apps.core import caches
from apps.core import redis as core_redis

from . import schemas, semantic
from .providers.base import Completion, Usage
from .versions import pinned_name

if TYPE_CHECKING:
    from .pipeline import Ctx

log = logging.getLogger(__name__)

# Not part of the key: how the answer is delivered, and who the end user is.
_NOT_IN_KEY = frozenset({"model", "stream", "stream_options", "user"})
_FLOAT_PARAMS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_STORABLE_FINISH = (None, "stop", "length")
_USAGE_FIELDS = tuple(f.name for f in fields(Usage))


# --- backends -------------------------------------------------------------------------------


class MemoryBackend:
    """An LRU in process, with per-entry expiry (wall clock, so tests can move it)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[0] <= time.time():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return entry[1]

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        with self._lock:
            self._data[key] = (time.time() + ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class RedisBackend:
    """Redis through the process's one client (apps.core.redis: its timeout policy and breaker),
    with GATEWAY_CACHE_TIMEOUT_S as this cache's own, shorter, deadline."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    async def get(self, key: str) -> bytes | None:
        return await core_redis.run(lambda: core_redis.send("GET", key), timeout_s=self.timeout_s)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await core_redis.run(lambda: core_redis.send("SET", key, value, "EX", ttl_s), timeout_s=self.timeout_s)

    def clear(self) -> None:
        pass


_backend: MemoryBackend | RedisBackend | None = None


def backend() -> MemoryBackend | RedisBackend:
    global _backend
    if _backend is None:
        if settings.GATEWAY_CACHE_BACKEND == "redis" and settings.REDIS_URL:
            _backend = RedisBackend(settings.GATEWAY_CACHE_TIMEOUT_S)
        else:
            _backend = MemoryBackend(settings.GATEWAY_CACHE_MAX_ENTRIES)
    return _backend


def cache_reset() -> None:
    """Forget the backend (and, in process, every entry). For tests and settings changes."""
    global _backend
    if _backend is not None:
        _backend.clear()
    _backend = None


caches.on_reset(cache_reset)


# --- policy and key -------------------------------------------------------------------------


def cacheable(ctx: Ctx) -> bool:
    if not settings.GATEWAY_CACHE_ENABLED or ctx.auth is None:
        return False
    if ctx.options.cache is not None:
        return ctx.options.cache
    if not ctx.auth.cache_enabled:
        return False
    if ctx.kind == "embeddings":
        return True
    temperature = ctx.body.get("temperature")
    return temperature is not None and float(temperature) == 0.0


def cache_key(ctx: Ctx) -> str:
    params = {k: v for k, v in ctx.body.items() if k not in _NOT_IN_KEY}
    native = ctx.request.native if ctx.request is not None else None
    if native:  # what a native deployment is sent, beyond the chat translation (thinking, cache_control)
        params["_native"] = {k: v for k, v in native.items() if k not in _NOT_IN_KEY}
    for name in _FLOAT_PARAMS:
        if isinstance(params.get(name), int | float):
            params[name] = float(params[name])
    model = pinned_name(ctx.model, ctx.version) if ctx.version else ctx.model  # a pinned version: its own answers
    digest = hashlib.sha256(orjson.dumps([ctx.kind, model, params], option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"llms:rc:{ctx.auth.tenant_id}:{digest}"


def prompt_digest(ctx: Ctx) -> str:
    """16 hex characters naming what this request's cache key names (the key computed at lookup,
    or now when the cache was off): recorded on the ledger row of a request the cache did not
    answer, so repeated prompts show without their text. The key holds the tenant id: the same
    prompt of two tenants gets two digests."""
    if ctx.auth is None or ctx.request is None or ctx.kind not in (schemas.CHAT, schemas.EMBEDDINGS):
        return ""
    return hashlib.sha256((ctx.cache_key or cache_key(ctx)).encode()).hexdigest()[:16]


def _storable(ctx: Ctx, completion: Completion) -> bool:
    if ctx.kind != "chat":
        return True
    for choice in completion.body.get("choices", ()):
        message = choice.get("message") or {}
        if message.get("tool_calls") or message.get("function_call") or \
                choice.get("finish_reason") not in _STORABLE_FINISH:
            return False
        if not isinstance(message.get("content"), str | None):
            return False
    return bool(completion.body.get("choices"))


def _entry(completion: Completion, version: str) -> dict:
    usage = {name: getattr(completion.usage, name) for name in _USAGE_FIELDS}
    return {"body": completion.body, "usage": usage, "version": version}


def decode_entry(data: dict) -> Completion:
    """A stored entry (exact or semantic) as the completion it keeps."""
    return Completion(body=data["body"], usage=Usage(**data["usage"]))


def _decode(raw: bytes) -> tuple[Completion, str]:
    """The stored completion and the model version that answered it."""
    data = orjson.loads(raw)
    return decode_entry(data), data.get("version", "")


# --- the two pipeline steps -----------------------------------------------------------------

_last_warning = 0.0


def _warn(what: str, exc: Exception) -> None:
    """A failing cache is reported at most every 10 s per process, not once per request."""
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= 10:
        _last_warning = now
        log.warning("response cache %s failed (%s: %s); requests go to the provider", what,
                    type(exc).__name__, exc)



async def lookup(ctx: Ctx) -> Completion | None:
    """The stored completion for this request, or None (a miss, a non-cacheable request, or a
    cache that cannot be reached)."""
    if not cacheable(ctx):
        return None
    ctx.cache_key = cache_key(ctx)  # admission may add or lower max_tokens later: store under this key
    try:
        raw = await backend().get(ctx.cache_key)
    except Exception as exc:  # any failure of the cache is a miss, never a failed request
        _warn("lookup", exc)
        return None
    if raw is None:
        return None
    try:
        completion, version = _decode(raw)
    except (ValueError, KeyError, TypeError):
        return None
    if version and not _serves(ctx, version):
        return None  # e.g. a canary's answer after its rollback
    ctx.hit_version = version
    return completion


def _serves(ctx: Ctx, version: str) -> bool:
    """Does `version` still serve this request (an answer it gave may be replayed)?"""
    alias = ctx.alias
    if alias is None or ctx.version:  # a pinned request's answers are under its own key
        return True
    return version in alias.versions and (not alias.rollout_names or version in alias.rollout_names)


def _semantic_miss(ctx: Ctx) -> bool:
    return ctx.semantic is not None and ctx.semantic.vector is not None


async def store(ctx: Ctx, completion: Completion) -> None:
    """Keep a successful completion for the key's (or tenant's) TTL, in the exact cache and, when
    the request looked it up there, the semantic cache (semantic.py). Never fails the request."""
    exact = cacheable(ctx)
    if ctx.cached or ctx.status != 200 or not (exact or _semantic_miss(ctx)) or not _storable(ctx, completion):
        return
    if "x-gateway-max-tokens-lowered" in ctx.headers:  # cut to fit a budget: not the answer to this request
        return
    entry = _entry(completion, ctx.model_version)
    raw = orjson.dumps(entry)
    if len(raw) > settings.GATEWAY_CACHE_MAX_ENTRY_BYTES:
        return
    if exact:
        try:
            await backend().set(ctx.cache_key or cache_key(ctx), raw, ctx.auth.cache_ttl_s)
        except Exception as exc:  # a cache that cannot store is not the client's problem
            _warn("store", exc)
    if _semantic_miss(ctx):
        await semantic.keep(ctx, entry)


class StreamRecorder:
    """Assembles a streamed answer into the chat.completion it stands for, so that a streamed miss
    is stored like a non-streamed one. A no-op for requests the cache does not keep."""

    __slots__ = ("ctx", "enabled", "head", "parts", "finish_reason", "role")

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.enabled = cacheable(ctx) or _semantic_miss(ctx)
        self.head: dict | None = None
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.role = "assistant"

    def add(self, chunk: dict) -> None:
        if not self.enabled:
            return
        if self.head is None:
            self.head = chunk
        for choice in chunk.get("choices", ()):
            if choice.get("index", 0) != 0:
                self.enabled = False
                return
            delta = choice.get("delta") or {}
            if delta.get("tool_calls") or delta.get("function_call"):
                self.enabled = False
                return
            if delta.get("content"):
                self.parts.append(delta["content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    async def store(self, usage: Usage) -> None:
        if not self.enabled or self.head is None or self.ctx.status != 200:
            return
        head = self.head
        body = {
            "id": head.get("id", self.ctx.request_id),
            "object": "chat.completion",
            "created": head.get("created", int(time.time())),
            "model": head.get("model", self.ctx.model),
            "choices": [{"index": 0, "message": {"role": self.role, "content": "".join(self.parts)},
                         "finish_reason": self.finish_reason or "stop"}],
            "usage": usage.as_openai(),
        }
        if head.get("system_fingerprint"):
            body["system_fingerprint"] = head["system_fingerprint"]
        await store(self.ctx, Completion(body=body, usage=usage))
