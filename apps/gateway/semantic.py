"""The semantic cache: a stored answer is served for a prompt that *means* the same, within the tenant.

Opt-in per tenant or key (`semantic_cache_enabled`), or per request (`x-gateway-semantic-cache: true`
or `metadata.semantic_cache`). The last user message is embedded with the tenant's (or key's)
embedding alias, through the gateway's own pipeline as an embeddings request of the same key: billed,
admitted, rate-limited and on the ledger like any other (apps/gateway/pipeline.py, `semantic_lookup`).
A stored answer is served when its prompt's cosine similarity reaches the threshold:

    threshold = request's, else key's, else tenant's, else GATEWAY_SEMANTIC_CACHE_THRESHOLD,
                and never below the model alias's own floor (`ModelAlias.semantic_cache_threshold`).

Only the last user message may differ: everything else (endpoint, model alias, embedding alias, the
earlier messages and every generation parameter) is hashed into a namespace and must match exactly.
Never used for requests with tools or functions (a paraphrase is not the same tool call), and,
unless the request asks, only for deterministic ones (temperature 0), as the exact cache.

Vectors live behind one interface (`VectorStore`) with two backends:
  * `PgvectorStore`: PostgreSQL with the pgvector extension; the database searches.
  * `IndexStore` (the embedded default and PostgreSQL without pgvector): rows in the database,
    searched with an in-process usearch index per (tenant, namespace). Before each search the index
    catches up with one indexed query (rows of that tenant and namespace newer than the last one it
    has, and those of the last FRESHNESS_WINDOW_S, in case an older id committed late), so an
    entry written by any instance is found by every other one on its next search.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

import numpy as np
import orjson
from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone
from usearch.index import Index

from apps.core import caches
from apps.core.db import db_sync

from .errors import invalid_request
from .models import SemanticCacheEntry
from .tokens import text_of

if TYPE_CHECKING:
    from .pipeline import Ctx

log = logging.getLogger(__name__)

ASK_HEADER = "x-gateway-semantic-cache"
THRESHOLD_HEADER = "x-gateway-semantic-threshold"
# Not part of the namespace: the prompt itself, and what the exact cache leaves out of its key.
_NOT_IN_NAMESPACE = frozenset({"model", "messages", "stream", "stream_options", "user", "system"})
_FLOAT_PARAMS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_TOOLS = ("tools", "functions", "tool_choice", "function_call")
FRESHNESS_WINDOW_S = 30  # rows this young are re-read by the catch-up query (ids may commit out of order)
# An index of more floats than this (about 2,600 vectors of 384 dimensions) is searched in a thread:
# measured on this machine, a search of 1,000 x 384 takes ~0.07 ms, of 10,000 x 384 ~0.3 ms, of
# 1,000 x 1,536 up to 1 ms (docs/cache-and-keys.md).
INLINE_SEARCH_MAX = 1_000_000
_BP = Decimal(10_000)


@dataclass(slots=True)
class Probe:
    """What a semantic lookup found out about a request, kept for storing its answer on a miss."""

    namespace: str
    embedding_alias: str
    threshold_bp: int  # basis points of cosine similarity (0-10000)
    vector: np.ndarray | None = None  # float32, unit length


@dataclass(frozen=True, slots=True)
class Match:
    entry_id: int
    similarity_bp: int
    payload: dict  # {"body": ..., "usage": ...}, as the exact cache stores it

    @property
    def similarity(self) -> Decimal:
        return Decimal(self.similarity_bp) / _BP


# --- policy ---------------------------------------------------------------------------------


def _bp(value: Decimal | float | str) -> int:
    return int((Decimal(str(value)) * _BP).to_integral_value())


def asked(headers) -> tuple[bool | None, Decimal | None]:
    """The request's own semantic-cache wish from its headers: (on/off or None, threshold or None).
    A malformed value is a 400, not silently ignored."""
    on: bool | None = None
    raw = (headers.get(ASK_HEADER) or "").strip().lower()
    if raw:
        if raw not in ("true", "false", "on", "off", "1", "0"):
            raise invalid_request(f"{ASK_HEADER} must be true or false.", param=ASK_HEADER,
                                  code="invalid_semantic_cache")
        on = raw in ("true", "on", "1")
    threshold: Decimal | None = None
    raw = (headers.get(THRESHOLD_HEADER) or "").strip()
    if raw:
        try:
            threshold = Decimal(raw)
        except ArithmeticError:
            threshold = None
        if threshold is None or not threshold.is_finite() or not 0 <= threshold <= 1:
            raise invalid_request(f"{THRESHOLD_HEADER} must be a number from 0 to 1.", param=THRESHOLD_HEADER,
                                  code="invalid_semantic_cache")
    return on, threshold


def prompt_text(ctx: Ctx) -> str:
    """What is embedded: the last user message (the part a paraphrase changes)."""
    for message in reversed(ctx.body.get("messages", ())):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def probe(ctx: Ctx) -> Probe | None:
    """A Probe when this request may use the semantic cache, else None."""
    auth = ctx.auth
    if not settings.GATEWAY_SEMANTIC_CACHE_ENABLED or auth is None or ctx.kind != "chat" or ctx.request is None:
        return None
    meta = ctx.metadata
    on = ctx.semantic_asked if ctx.semantic_asked is not None else meta.semantic_cache
    if ctx.options.cache is False or on is False:
        return None
    if not (on or auth.semantic_cache_enabled):
        return None
    body = ctx.body
    native = ctx.request.native or {}
    if any(body.get(t) for t in _TOOLS) or any(native.get(t) for t in _TOOLS):
        return None  # a tool call is not answered by a paraphrase's
    if not (on or ctx.options.cache):
        temperature = body.get("temperature")
        if temperature is None or float(temperature) != 0.0:
            return None
    alias = auth.semantic_cache_embedding_alias
    text = prompt_text(ctx)
    if not alias or not text.strip():
        return None
    asked_threshold = ctx.semantic_threshold_asked
    if asked_threshold is None and meta.semantic_cache_threshold is not None:
        asked_threshold = Decimal(str(meta.semantic_cache_threshold))
    threshold = asked_threshold if asked_threshold is not None else auth.semantic_cache_threshold
    if threshold is None:
        threshold = settings.GATEWAY_SEMANTIC_CACHE_THRESHOLD
    floor = ctx.alias.semantic_cache_threshold if ctx.alias is not None else None
    if floor is not None:
        threshold = max(threshold, floor)
    return Probe(namespace=namespace(ctx, alias), embedding_alias=alias, threshold_bp=_bp(threshold))


def namespace(ctx: Ctx, embedding_alias: str) -> str:
    """Everything but the last user message, hashed: entries are only compared within one."""
    body = ctx.body
    params = {k: v for k, v in body.items() if k not in _NOT_IN_NAMESPACE}
    for name in _FLOAT_PARAMS:
        if isinstance(params.get(name), int | float):
            params[name] = float(params[name])
    messages = list(body.get("messages", ()))
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    context = [m for i, m in enumerate(messages) if i != last_user]
    native = ctx.request.native if ctx.request is not None else None
    if native:
        params["_native"] = {k: v for k, v in native.items() if k not in _NOT_IN_NAMESPACE}
    raw = orjson.dumps([ctx.kind, ctx.model, embedding_alias, context, params], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()


def unit_vector(embedding: list[float]) -> np.ndarray | None:
    vector = np.asarray(embedding, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if vector.ndim != 1 or not vector.size or not np.isfinite(norm) or norm == 0:
        return None
    return vector / norm


# --- the store interface and its two backends -----------------------------------------------


class VectorStore(Protocol):
    async def add(self, *, tenant_id: int, namespace: str, vector: np.ndarray, payload: dict, ttl_s: int) -> int:
        """Keep `payload` under this vector; returns the entry id."""

    async def search(self, *, tenant_id: int, namespace: str, vector: np.ndarray, threshold_bp: int) -> Match | None:
        """The most similar live entry of this tenant and namespace at or above the threshold."""

    def clear(self) -> None:
        """Forget what is held in process (not the rows)."""


def _entry_create(*, tenant_id: int, namespace: str, vector: np.ndarray, payload: dict, ttl_s: int) -> int:
    now = timezone.now()
    entry = SemanticCacheEntry.objects.create(
        tenant_id=tenant_id, namespace=namespace, dims=int(vector.shape[0]),
        vector=vector.astype("<f4").tobytes(), response=payload, created_at=now,
        expires_at=now + timedelta(seconds=ttl_s))
    return entry.pk


def _entry_payload(*, tenant_id: int, entry_id: int) -> dict | None:
    return (SemanticCacheEntry.objects.filter(pk=entry_id, tenant_id=tenant_id, expires_at__gt=timezone.now())
            .values_list("response", flat=True).first())


def _rows_after(*, tenant_id: int, namespace: str, dims: int, after: int) -> list[tuple[int, bytes, float]]:
    """Rows of one tenant and namespace the index may lack: newer than `after`, or young enough that
    an older id may have committed after it was read. One query on (tenant, namespace, id)."""
    now = timezone.now()
    young = now - timedelta(seconds=FRESHNESS_WINDOW_S)
    qs = (SemanticCacheEntry.objects.filter(tenant_id=tenant_id, namespace=namespace, dims=dims,
                                            expires_at__gt=now)
          .filter(Q(id__gt=after) | Q(created_at__gte=young)).order_by("id").values_list("id", "vector", "expires_at"))
    return [(pk, bytes(vec), exp.timestamp()) for pk, vec, exp in qs]


class _Index:
    __slots__ = ("index", "last_id", "expires", "lock")

    def __init__(self, dims: int):
        self.index = Index(ndim=dims, metric="cos", dtype="f32")
        self.last_id = 0
        self.expires: dict[int, float] = {}
        self.lock = threading.Lock()

    def _catch_up(self, rows: list[tuple[int, bytes, float]]) -> None:
        new = [(pk, vec, exp) for pk, vec, exp in rows if pk not in self.expires]
        if new:
            keys = np.asarray([pk for pk, _, _ in new], dtype=np.uint64)
            vectors = np.stack([np.frombuffer(vec, dtype="<f4") for _, vec, _ in new])
            self.index.add(keys, vectors)
            for pk, _, exp in new:
                self.expires[pk] = exp
            self.last_id = max(self.last_id, int(keys.max()))

    def _search(self, vector: np.ndarray, threshold_bp: int) -> list[tuple[int, int]]:
        if not len(self.index):
            return []
        found = self.index.search(vector, min(8, len(self.index)))
        now = time.time()
        out = []
        for key, distance in zip(found.keys, found.distances, strict=False):
            bp = int(round((1.0 - float(distance)) * 10_000))
            if bp < threshold_bp:
                break
            if self.expires.get(int(key), 0) > now:
                out.append((int(key), bp))
        return out

    def catch_up_and_search(self, rows: list[tuple[int, bytes, float]], vector: np.ndarray,
                            threshold_bp: int) -> list[tuple[int, int]]:
        """(entry id, similarity bp) of live candidates at or above the threshold, best first."""
        with self.lock:
            self._catch_up(rows)
            return self._search(vector, threshold_bp)

    def search_inline(self, vector: np.ndarray, threshold_bp: int) -> list[tuple[int, int]] | None:
        """The same, on the event loop: only for a small index nobody else holds; else None."""
        if len(self.index) * self.index.ndim > INLINE_SEARCH_MAX or not self.lock.acquire(blocking=False):
            return None
        try:
            return self._search(vector, threshold_bp)
        finally:
            self.lock.release()

    def forget(self, key: int) -> None:
        with self.lock:
            if self.expires.pop(key, None) is not None:
                self.index.remove(key)

    def __len__(self) -> int:
        return len(self.index)


class IndexStore:
    """Rows in the database; per (tenant, namespace, dims) an in-process usearch index, caught up
    before each search, kept in an LRU of GATEWAY_SEMANTIC_CACHE_MAX_INDEXES (an evicted one is
    rebuilt from the rows on its next use)."""

    name = "index"

    def __init__(self, max_indexes: int):
        self.max_indexes = max_indexes
        self._indexes: OrderedDict[tuple[int, str, int], _Index] = OrderedDict()
        self._lock = threading.Lock()

    def _index(self, key: tuple[int, str, int]) -> _Index:
        with self._lock:
            idx = self._indexes.get(key)
            if idx is None:
                idx = self._indexes[key] = _Index(key[2])
                while len(self._indexes) > self.max_indexes:
                    self._indexes.popitem(last=False)
            self._indexes.move_to_end(key)
            return idx

    async def add(self, *, tenant_id: int, namespace: str, vector: np.ndarray, payload: dict, ttl_s: int) -> int:
        return await db_sync(_entry_create, tenant_id=tenant_id, namespace=namespace, vector=vector,
                             payload=payload, ttl_s=ttl_s)

    async def search(self, *, tenant_id: int, namespace: str, vector: np.ndarray, threshold_bp: int) -> Match | None:
        dims = int(vector.shape[0])
        idx = self._index((tenant_id, namespace, dims))
        rows = await db_sync(_rows_after, tenant_id=tenant_id, namespace=namespace, dims=dims, after=idx.last_id)
        rows = [row for row in rows if row[0] not in idx.expires]  # the young ones re-read are mostly known
        candidates = None if rows else idx.search_inline(vector, threshold_bp)
        if candidates is None:  # adding vectors (HNSW inserts) and large searches run off the event loop
            candidates = await asyncio.to_thread(idx.catch_up_and_search, rows, vector, threshold_bp)
        for entry_id, bp in candidates:
            payload = await db_sync(_entry_payload, tenant_id=tenant_id, entry_id=entry_id)
            if payload is not None:
                return Match(entry_id=entry_id, similarity_bp=bp, payload=payload)
            idx.forget(entry_id)  # expired or purged meanwhile
        return None

    def clear(self) -> None:
        with self._lock:
            self._indexes.clear()


def _pg_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector.tolist()) + "]"


class PgvectorStore:
    """The database searches: `embedding <=> query` over the tenant's namespace (the column and the
    extension are added by the migration when the server has pgvector)."""

    name = "pgvector"

    async def add(self, *, tenant_id: int, namespace: str, vector: np.ndarray, payload: dict, ttl_s: int) -> int:
        def insert() -> int:
            pk = _entry_create(tenant_id=tenant_id, namespace=namespace, vector=vector, payload=payload,
                               ttl_s=ttl_s)
            with connection.cursor() as cur:
                cur.execute(f"UPDATE {_TABLE} SET embedding = %s::vector WHERE id = %s",  # noqa: S608
                            [_pg_literal(vector), pk])
            return pk

        return await db_sync(insert)

    async def search(self, *, tenant_id: int, namespace: str, vector: np.ndarray, threshold_bp: int) -> Match | None:
        def query():
            literal = _pg_literal(vector)
            with connection.cursor() as cur:
                cur.execute(
                    f"SELECT id, 1 - (embedding <=> %s::vector), response FROM {_TABLE} "  # noqa: S608
                    "WHERE tenant_id = %s AND namespace = %s AND dims = %s AND expires_at > %s "
                    "AND embedding IS NOT NULL ORDER BY embedding <=> %s::vector LIMIT 1",
                    [literal, tenant_id, namespace, int(vector.shape[0]), timezone.now(), literal])
                return cur.fetchone()

        row = await db_sync(query)
        if row is None:
            return None
        bp = int(round(float(row[1]) * 10_000))
        if bp < threshold_bp:
            return None
        payload = row[2] if isinstance(row[2], dict) else orjson.loads(row[2])
        return Match(entry_id=row[0], similarity_bp=bp, payload=payload)

    def clear(self) -> None:
        pass


_TABLE = SemanticCacheEntry._meta.db_table


def pgvector_ready() -> bool:
    """Whether this database has the pgvector extension and the entries' `embedding` column."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
        if cur.fetchone() is None:
            return False
        cur.execute("SELECT 1 FROM information_schema.columns WHERE table_name = %s AND column_name = 'embedding'",
                    [_TABLE])
        return cur.fetchone() is not None


_store: VectorStore | None = None


async def store() -> VectorStore:
    global _store
    if _store is None:
        choice = settings.GATEWAY_SEMANTIC_CACHE_STORE
        if choice == "pgvector" or (choice == "auto" and await db_sync(pgvector_ready)):
            _store = PgvectorStore()
        else:
            _store = IndexStore(settings.GATEWAY_SEMANTIC_CACHE_MAX_INDEXES)
    return _store


def store_reset() -> None:
    global _store
    if _store is not None:
        _store.clear()
    _store = None


caches.on_reset(store_reset)


# --- the pipeline's two steps (the embedding call itself is pipeline.semantic_lookup's) --------

_last_warning = 0.0


def warn(what: str, exc: BaseException) -> None:
    """A failing semantic cache is reported at most every 10 s per process; the request goes on."""
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= 10:
        _last_warning = now
        log.warning("semantic cache %s failed (%s: %s); the request goes on without it", what,
                    type(exc).__name__, exc)


async def search(ctx: Ctx, vector: np.ndarray) -> Match | None:
    p = ctx.semantic
    p.vector = vector
    try:
        return await (await store()).search(tenant_id=ctx.auth.tenant_id, namespace=p.namespace, vector=vector,
                                            threshold_bp=p.threshold_bp)
    except Exception as exc:  # a miss, never a failed request
        warn("search", exc)
        return None


async def keep(ctx: Ctx, payload: dict) -> None:
    """Store the answer of a semantic miss under its prompt's vector. Never fails the request."""
    p = ctx.semantic
    if p is None or p.vector is None:
        return
    try:
        await (await store()).add(tenant_id=ctx.auth.tenant_id, namespace=p.namespace, vector=p.vector,
                                  payload=payload, ttl_s=ctx.auth.cache_ttl_s)
    except Exception as exc:
        warn("store", exc)


def entries_purge() -> int:
    """Delete expired entries (housekeeping task)."""
    deleted, _ = SemanticCacheEntry.objects.filter(expires_at__lte=timezone.now()).delete()
    return deleted
