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
    searched in process per (tenant, namespace) with usearch's exact SIMD search over the vectors
    kept in memory. Before each search the index catches up with one range scan (rows of that tenant
    and namespace with an id above the newest it has, less LOOKBACK_IDS in case an older id committed
    late, that it lacks), so an entry written by any instance is found by every other one on its
    next search.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

import numpy as np
import orjson

# pyarrow (the ledger archive's Parquet files) must be loaded before usearch: usearch's extension,
# loaded first, breaks pyarrow in the same process (its type names come out truncated and reading a
# Parquet file crashes the process; seen with usearch 2.26 and pyarrow 26).
import pyarrow  # noqa: F401, I001
from django.conf import settings
from django.db import connection
from django.utils import timezone
from usearch.index import MetricKind
from usearch.index import search as usearch_search

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
# Ids come from one sequence for every tenant and may commit out of order across instances (an id is
# taken at INSERT, the row seen at its commit, microseconds later): the catch-up looks this many ids
# below the newest it has for rows it lacks.
LOOKBACK_IDS = 1_000
SETTLE_S = 5.0  # ... but an id seen this long ago has no older id still to commit
CATCH_UP_CHUNK = 1_000  # rows read per query when an index catches up (a rebuild reads many)
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


def _last_user(ctx: Ctx) -> dict:
    return next((m for m in reversed(ctx.body.get("messages", ())) if m.get("role") == "user"), {})


def prompt_text(ctx: Ctx) -> str:
    """What is embedded: the last user message (the part a paraphrase changes)."""
    return text_of(_last_user(ctx).get("content"))


def _text_only(ctx: Ctx) -> bool:
    """An image or audio part is not in the embedded text: such a prompt is never compared."""
    content = _last_user(ctx).get("content")
    return not isinstance(content, list) or all(isinstance(p, dict) and p.get("type") == "text" for p in content)


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
    if not _text_only(ctx):
        return None
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


def _rows_after(*, tenant_id: int, namespace: str, dims: int, since: int, known: list[int],
                limit: int = 0) -> list[tuple]:
    """Rows of one tenant and namespace the index lacks: ids above `since` (the newest it has, less
    LOOKBACK_IDS: an id taken earlier may commit later) that it does not hold yet. One range scan
    of the (tenant, namespace, id) index; the vectors of known rows are not read again."""
    now = timezone.now()
    qs = (SemanticCacheEntry.objects.filter(tenant_id=tenant_id, namespace=namespace, dims=dims, id__gt=since,
                                            expires_at__gt=now)
          .exclude(id__in=known).order_by("id").values_list("id", "vector", "expires_at"))
    return [(pk, bytes(vec), exp.timestamp()) for pk, vec, exp in (qs[:limit] if limit else qs)]


class _Index:
    """One namespace's vectors in a contiguous float32 matrix (grown by doubling), searched exactly
    with usearch's SIMD brute force: no build cost (an HNSW graph took 0.2-1 ms per insert on this
    machine, minutes to rebuild 20,000 entries), no missed neighbour, and linear search time
    (figures in docs/cache-and-keys.md). Expired or purged rows are dropped from the results and
    compacted away once they are half of it."""

    __slots__ = ("dims", "ids", "vectors", "size", "expires", "last_id", "marks", "lock")

    def __init__(self, dims: int):
        self.dims = dims
        self.ids = np.zeros(0, dtype=np.int64)
        self.vectors = np.zeros((0, dims), dtype=np.float32)
        self.size = 0
        self.expires: dict[int, float] = {}  # entry id -> expiry (epoch s); 0: forgotten
        self.last_id = 0
        self.marks: deque[tuple[float, int]] = deque()  # (monotonic time, last_id then)
        self.lock = threading.Lock()

    def since(self) -> int:
        """The id above which the catch-up looks: LOOKBACK_IDS below the newest, but never below the
        newest this index had SETTLE_S ago (an id taken before it was seen would have committed)."""
        if not self.last_id:
            return 0
        now = time.monotonic()
        while len(self.marks) > 1 and self.marks[1][0] <= now - SETTLE_S:
            self.marks.popleft()
        settled = self.marks[0][1] if self.marks and self.marks[0][0] <= now - SETTLE_S else 0
        return max(self.last_id - LOOKBACK_IDS, settled, 0)

    def known_since(self, since: int) -> list[int]:
        # list(dict) copies in one step under the GIL: safe while a thread catches up (no lock is
        # taken on the event loop, where a long search in a thread would hold it)
        return [pk for pk in list(self.expires) if pk > since]

    def _append(self, rows: list[tuple[int, bytes, float]]) -> None:
        new = [(pk, vec, exp) for pk, vec, exp in rows if pk not in self.expires]
        if not new:
            return
        need = self.size + len(new)
        if need > len(self.ids):
            capacity = max(need, 2 * len(self.ids), 64)
            ids = np.zeros(capacity, dtype=np.int64)
            vectors = np.zeros((capacity, self.dims), dtype=np.float32)
            ids[:self.size], vectors[:self.size] = self.ids[:self.size], self.vectors[:self.size]
            self.ids, self.vectors = ids, vectors
        for offset, (pk, vec, exp) in enumerate(new):
            self.ids[self.size + offset] = pk
            self.vectors[self.size + offset] = np.frombuffer(vec, dtype="<f4")
            self.expires[pk] = exp
        self.size = need
        self.last_id = max(self.last_id, max(pk for pk, _, _ in new))
        self.marks.append((time.monotonic(), self.last_id))

    def _compact(self) -> None:
        live = [i for i in range(self.size) if self.expires.get(int(self.ids[i]), 0) > 0]
        if len(live) * 2 > self.size:
            return
        self.ids, self.vectors = self.ids[live].copy(), self.vectors[live].copy()
        self.size = len(live)
        self.expires = {pk: exp for pk, exp in self.expires.items() if exp > 0}

    def _search(self, vector: np.ndarray, threshold_bp: int) -> list[tuple[int, int]]:
        if not self.size:
            return []
        found = usearch_search(self.vectors[:self.size], vector, min(8, self.size), MetricKind.Cos, exact=True)
        now = time.time()
        out = []
        for position, distance in zip(found.keys, found.distances, strict=False):
            bp = int(round((1.0 - float(distance)) * 10_000))
            if bp < threshold_bp:
                break
            pk = int(self.ids[int(position)])
            if self.expires.get(pk, 0) > now:
                out.append((pk, bp))
        return out

    def catch_up_and_search(self, rows: list[tuple[int, bytes, float]], vector: np.ndarray,
                            threshold_bp: int) -> list[tuple[int, int]]:
        """(entry id, similarity bp) of live candidates at or above the threshold, best first."""
        with self.lock:
            self._append(rows)
            return self._search(vector, threshold_bp)

    def search_inline(self, vector: np.ndarray, threshold_bp: int) -> list[tuple[int, int]] | None:
        """The same, on the event loop: only for a small index nobody else holds; else None."""
        if self.size * self.dims > INLINE_SEARCH_MAX or not self.lock.acquire(blocking=False):
            return None
        try:
            return self._search(vector, threshold_bp)
        finally:
            self.lock.release()

    def forget(self, key: int) -> None:
        with self.lock:
            if key in self.expires:
                self.expires[key] = 0
                self._compact()

    def __len__(self) -> int:
        return self.size


class IndexStore:
    """Rows in the database; per (tenant, namespace, dims) an in-process index (`_Index`), caught up
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
        since = idx.since()
        known = idx.known_since(since)
        rows: list[tuple] = []
        while True:  # in chunks: the process's one sync DB thread is never held long by a rebuild
            chunk = await db_sync(_rows_after, tenant_id=tenant_id, namespace=namespace, dims=dims, since=since,
                                  known=known, limit=CATCH_UP_CHUNK)
            rows += chunk
            if len(chunk) < CATCH_UP_CHUNK:
                break
            since = chunk[-1][0]
            known = [pk for pk in known if pk > since]
        candidates = None if rows else idx.search_inline(vector, threshold_bp)
        if candidates is None:  # catching up (copying vectors in) and large searches run off the event loop
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
