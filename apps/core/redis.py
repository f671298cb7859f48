"""The one Redis client of the process, with one timeout policy.

- One async client per event loop (redis.asyncio connections belong to the loop that opened them),
  no retries inside redis-py: a failure is reported at once.
- Every call goes through `run`, which bounds it by REDIS_TIMEOUT_S and raises `StateUnavailable`
  on any Redis error or timeout.
- A request never waits more than REDIS_TIMEOUT_S in total on Redis: `request_begin()` opens a
  wait budget for the current task, and every call spends from it.
- After a connection failure, or BREAKER_FAILURES timeouts in a row, calls fail fast for
  REDIS_RETRY_AFTER_S (a breaker shared by the process), so a Redis that is down costs one
  timeout, not one per request and per step.
- A new connection checks the server's run id: a restarted server, a failover to a replica or a
  restore from an old snapshot has another run id, and whatever counters it holds are suspect.
  Listeners registered with `on_new_server` are told (the budget counters rebuild themselves).
- `redis://`, `redis+sentinel://` (the master the Sentinels name) and `redis+cluster://` (Redis
  Cluster; each node is a server of its own, checked on its own: a failover promotes a replica
  with another run id, and the keys of that node's slots are validated again).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from django.conf import settings
from hiredis import pack_command

from . import caches
from .redis_url import ClusterURL, SentinelURL, cluster_url, sentinel_url  # noqa: F401 - the URL forms

log = logging.getLogger(__name__)


class StateUnavailable(Exception):
    """The shared state (Redis) could not be reached in time."""


_clients: dict[int, tuple[asyncio.AbstractEventLoop, object]] = {}
_down_until = 0.0
# (the request's task, seconds left): a budget is spent only by the task that opened it (a context
# copied elsewhere, as asgiref's bridges copy it back to their caller, does not inherit it).
_budget: contextvars.ContextVar[tuple[object, list[float]] | None] = contextvars.ContextVar("redis_wait_budget",
                                                                                            default=None)


def configured() -> bool:
    return bool(settings.REDIS_URL)


def client():
    """The async client of the running loop."""
    loop = asyncio.get_running_loop()
    entry = _clients.get(id(loop))
    if entry is not None and entry[0] is loop:
        return entry[1]
    return _client_new(loop)


def _client_new(loop: asyncio.AbstractEventLoop):
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    for key, (old, _c) in list(_clients.items()):
        if old.is_closed():
            del _clients[key]
    timeout = settings.REDIS_TIMEOUT_S
    # No socket_timeout: `run` bounds every call already, and redis-py would wrap each send in
    # one more asyncio.wait_for (a task per command).
    common = {"socket_timeout": None, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
    sentinel = sentinel_url(settings.REDIS_URL)
    cluster = cluster_url(settings.REDIS_URL)
    if cluster is not None:
        entry = _clients[id(loop)] = (loop, _cluster_client(cluster, common))
        _cluster_ids.add(id(entry[1]))
        return entry[1]
    if sentinel is None:
        pool = aioredis.ConnectionPool.from_url(settings.REDIS_URL, connection_class=_ServerCheckedConnection,
                                                **common)
    else:  # each new connection asks the Sentinels for the current master
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

        manager = Sentinel(sentinel.hosts, sentinel_kwargs=sentinel.sentinel_kwargs(timeout))
        pool = SentinelConnectionPool(sentinel.service, manager, connection_class=_SentinelServerChecked,
                                      **sentinel.master_kwargs(), **common)
    entry = _clients[id(loop)] = (loop, aioredis.Redis(connection_pool=pool))
    return entry[1]


# --- commands of one event-loop turn, sent together ---------------------------------------------


class _Batch:
    """The commands issued in one turn of a loop, sent as one pipeline on one connection (one
    write, one read) when the turn ends. Under load many requests reach admission or settle in the
    same turn; each would otherwise pay its own send, its own wake-up and its own read. A lone
    request waits for nothing: its command goes out at the end of the turn that issued it.

    An unhurried command (`unhurried()`: a settle, once its answer is sent, while other requests are
    in flight) waits up to UNHURRIED_S for company instead: it goes out with the next command any
    request issues, so it costs no send or wake-up of its own. (A lone request's settle does not
    wait: it would go ahead of the next request's admission, which would wait for it.)"""

    __slots__ = ("entries", "loop", "pool", "soon", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, pool):
        self.loop = loop
        self.pool = pool
        # (command, fallback, future, unhurried)
        self.entries: list[tuple[tuple, tuple | None, asyncio.Future, bool]] = []
        self.soon = False  # a flush at the end of this turn is scheduled
        self.timer: asyncio.TimerHandle | None = None  # a flush of unhurried commands only

    def add(self, command: tuple, fallback: tuple | None) -> asyncio.Future:
        unhurried = _unhurried.get()
        if not self.soon:
            if not unhurried:
                self.soon = True
                self.loop.call_soon(self._flush)
            elif self.timer is None:
                self.timer = self.loop.call_later(UNHURRIED_S, self._flush)
        fut = self.loop.create_future()
        self.entries.append((command, fallback, fut, unhurried))
        return fut

    def _flush(self) -> None:
        self.soon = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.entries:
            return
        entries, self.entries = self.entries, []
        task = self.loop.create_task(self._send(entries))
        _flushing.add(task)
        task.add_done_callback(_flushing.discard)

    async def _send(self, entries) -> None:
        import redis

        conn = None
        try:
            async with asyncio.timeout(settings.REDIS_TIMEOUT_S):
                conn = await self.pool.get_connection()
                # hiredis packs in C: redis-py's asyncio connection packs in Python, ten times slower
                # for a script call with its dozens of keys and arguments.
                await conn.send_packed_command(b"".join([pack_command(e[0]) for e in entries]))
                replies = []
                for _ in entries:
                    try:
                        replies.append(await conn.read_response())
                    except redis.ResponseError as exc:
                        replies.append(exc)
                for i, (_command, fallback, _fut, _later) in enumerate(entries):
                    # A script the server does not know yet (restart, flush): once more, with its source.
                    if fallback is not None and isinstance(replies[i], redis.exceptions.NoScriptError):
                        await conn.send_command(*fallback)
                        try:
                            replies[i] = await conn.read_response()
                        except redis.ResponseError as exc:
                            replies[i] = exc
        except BaseException as exc:
            if conn is not None:
                await conn.disconnect()
            failure = exc if isinstance(exc, Exception) else redis.ConnectionError("cancelled")
            for _command, _fallback, fut, _later in entries:
                if not fut.done():
                    fut.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            if conn is not None:
                await self.pool.release(conn)
        # The requests waiting on their replies go on first; the unhurried (settles after their
        # answers) resume after them, so their follow-up work does not delay a request's next step.
        for later in (False, True):
            for (_command, _fallback, fut, unhurried), reply in zip(entries, replies, strict=True):
                if unhurried is later and not fut.done():
                    if isinstance(reply, Exception):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)


_batches: dict[int, _Batch] = {}
_flushing: set[asyncio.Task] = set()
UNHURRIED_S = 0.005
_unhurried: contextvars.ContextVar[bool] = contextvars.ContextVar("redis_unhurried", default=False)


def unhurried() -> None:
    """The current task's commands may wait (up to UNHURRIED_S) to go out with others (_Batch)."""
    _unhurried.set(True)


def send(*command) -> Awaitable:
    """Send one command with the others of this loop turn; its reply (raw, as the server sent it)
    is the awaitable's result. Await it inside `run`. On a Redis Cluster each command goes on its
    own to the node of its keys (commands of one turn may be for different nodes)."""
    c = client()
    if _is_cluster(c):
        return c.execute_command(*command)
    return _batch().add(command, None)


def script(source: str, keys: list, args: list) -> Awaitable:
    """EVALSHA of a Lua script (EVAL once when the server does not know it), batched as `send`."""
    sha = _shas.get(source)
    if sha is None:
        sha = _shas[source] = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()  # as Redis names it
    n = len(keys)
    c = client()
    if _is_cluster(c):
        return _cluster_script(c, ("EVALSHA", sha, n, *keys, *args), ("EVAL", source, n, *keys, *args))
    return _batch().add(("EVALSHA", sha, n, *keys, *args), ("EVAL", source, n, *keys, *args))


async def _cluster_script(c, command: tuple, fallback: tuple):
    import redis

    try:
        return await c.execute_command(*command)
    except redis.exceptions.NoScriptError:
        return await c.execute_command(*fallback)


_cluster_ids: set[int] = set()  # the clients of a Redis Cluster (kept alive in _clients)


def _is_cluster(c) -> bool:
    return id(c) in _cluster_ids


_shas: dict[str, str] = {}


def _batch() -> _Batch:
    loop = asyncio.get_running_loop()
    batch = _batches.get(id(loop))
    if batch is None or batch.loop is not loop:
        batch = _batches[id(loop)] = _Batch(loop, client().connection_pool)
    return batch


def _cluster_client(cluster: ClusterURL, common: dict):
    """A RedisCluster whose connections (to whichever node the slot map names) check their server.
    MOVED/ASK redirects are followed by redis-py (they are not retries); nothing else is retried."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.hosts], **common,
                          **cluster.node_kwargs())
    checked = _ClusterSSLServerChecked if cluster.ssl else _ClusterServerChecked
    client.connection_kwargs["connection_class"] = checked  # the nodes it discovers later
    for node in client.startup_nodes:
        node.connection_class = checked
    return client


def sync_client():
    """A blocking client, for management commands, beat tasks and tests (never the hot path)."""
    return sync_client_for(settings.REDIS_URL)


def sync_client_for(url: str, *, timeout_s: float | None = None):
    """A blocking client for a `redis://` URL, a `redis+sentinel://` one (then of the current master)
    or a `redis+cluster://` one (a RedisCluster)."""
    import redis

    timeout = settings.REDIS_TIMEOUT_S if timeout_s is None else timeout_s
    cluster = cluster_url(url)
    if cluster is not None:
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.hosts], socket_timeout=timeout,
                            socket_connect_timeout=timeout, **cluster.node_kwargs())
    sentinel = sentinel_url(url)
    if sentinel is None:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    from redis.sentinel import Sentinel

    manager = Sentinel(sentinel.hosts, sentinel_kwargs=sentinel.sentinel_kwargs(timeout))
    return manager.master_for(sentinel.service, socket_timeout=timeout, socket_connect_timeout=timeout,
                              **sentinel.master_kwargs())


def request_begin() -> None:
    """Open a fresh wait budget (REDIS_TIMEOUT_S) for the current request's task."""
    _budget.set((asyncio.current_task(), [settings.REDIS_TIMEOUT_S]))


BREAKER_FAILURES = 3  # consecutive failures that open the breaker (one slow answer under load does not)
_failures = 0


async def run(make: Callable[[], Awaitable], *, timeout_s: float | None = None, own_budget: bool = False):
    """Await `make()` within the policy; raise StateUnavailable when Redis cannot answer in time.
    `own_budget`: not charged to the request's wait budget, only bounded by REDIS_TIMEOUT_S itself
    (a settle: giving a hold back must not fail because admission was slow)."""
    global _down_until, _failures
    import redis

    now = time.monotonic()
    if now < _down_until:
        raise StateUnavailable("recently unreachable")
    opened = None if own_budget else _budget.get()
    budget = opened[1] if opened is not None and opened[0] is asyncio.current_task() else None
    limit = min(timeout_s or settings.REDIS_TIMEOUT_S, settings.REDIS_TIMEOUT_S)
    if budget is not None:
        if budget[0] <= 0:
            raise StateUnavailable("this request's wait on Redis is spent")
        limit = min(limit, budget[0])
    try:
        async with asyncio.timeout(limit):
            result = await make()
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError, TimeoutError, AttributeError) as exc:
        if isinstance(exc, AttributeError) and not _inside_redis_py(exc):
            raise  # a bug of ours, not the connection
        if not isinstance(exc, redis.ResponseError) or isinstance(exc, NewServer):
            _failures += 1
            if _failures >= BREAKER_FAILURES or isinstance(exc, redis.ConnectionError | ConnectionRefusedError):
                _down_until = time.monotonic() + settings.REDIS_RETRY_AFTER_S
        raise StateUnavailable(type(exc).__name__) from exc
    finally:
        if budget is not None:
            budget[0] -= time.monotonic() - now
    _failures = 0
    return result


def _inside_redis_py(exc: BaseException) -> bool:
    """An exception raised inside redis-py itself: during a cluster failover, a connection another
    task closed mid-handshake fails with an AttributeError on its missing writer (a lost connection
    for us). SlotNotCoveredError and other RedisClusterException are not RedisError either."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/redis/" in tb.tb_frame.f_code.co_filename


# --- the server behind the URL ------------------------------------------------------------------

_known_run_ids: dict[str, str] = {}  # scope ("" for the one server, "host:port" per cluster node) -> run id
_listeners: list[Callable[..., Awaitable[None]]] = []


async def conn_command(conn, *args):
    """One command on one raw connection (listeners run inside a connection's handshake)."""
    await conn.send_command(*args, check_health=False)
    return await conn.read_response()


def on_new_server(fn: Callable[..., Awaitable[None]]) -> None:
    """`await fn(run_id, previous_run_id, conn)` when a connection finds a server this process has not
    validated yet (first contact, restart, failover, restore). It runs before that connection
    serves any command (use `conn_command(conn, ...)`); while it fails, the connection is refused.
    On a cluster, `conn` is one node's: only keys of that node's slots can be used on it (see
    `node_tag`), and the previous run id is that node address's."""
    if fn not in _listeners:
        _listeners.append(fn)


async def node_tag(conn) -> str:
    """A hash tag (`{...}`) of a slot the node behind `conn` serves, for keys about that node itself
    (which server its keys were validated on); "" when `conn` is not a cluster node's."""
    if not getattr(conn, "cluster_node", False):
        return ""
    nodes = await conn_command(conn, "CLUSTER", "NODES")
    nodes = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    for line in nodes.splitlines():
        fields = line.split()
        if len(fields) > 8 and "myself" in fields[2].split(","):
            for item in fields[8:]:
                if item[:1].isdigit():
                    return "{" + _tag_for_slot(int(item.split("-")[0])) + "}"
    raise _connection_error()("this cluster node serves no slot (a replica?)")


def _tag_for_slot(slot: int) -> str:
    """The first `n<i>` that Redis Cluster hashes to `slot` (a few thousand CRC16s at most, cached)."""
    from redis.crc import key_slot

    found = _slot_tags.get(slot)
    i = 0
    while found is None:
        tag = f"n{i}"
        _slot_tags.setdefault(key_slot(tag.encode()), tag)
        found = _slot_tags.get(slot)
        i += 1
    return found


_slot_tags: dict[int, str] = {}


def _connection_error():
    import redis

    return redis.exceptions.ConnectionError


class NewServer(_connection_error()):
    """The connection reached a server whose state is being validated; it is refused for now."""


def _reset() -> None:
    global _down_until, _failures
    _known_run_ids.clear()
    _down_until = 0.0
    _failures = 0
    _clients.clear()
    _cluster_ids.clear()
    _batches.clear()


caches.on_reset(_reset)


class _RunIdCheck:
    """On every new connection: which server is this? (see on_new_server)

    redis-py 6+ runs the handshake in `on_connect_check_health` (its `connect` no longer calls
    `on_connect`); older versions run it in `on_connect`. The check hooks whichever the installed
    version calls, once per connection."""

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health=check_health)
        await self._check_server()

    async def on_connect(self) -> None:
        await super().on_connect()
        if not hasattr(super(), "on_connect_check_health"):  # redis-py < 6: on_connect is the handshake
            await self._check_server()

    cluster_node = False  # True: one node of a cluster, its own server (validated by address)

    async def _check_server(self) -> None:
        info = await conn_command(self, "INFO", "server")
        if isinstance(info, bytes):
            info = info.decode()
        run_id = ""
        for line in str(info).splitlines():
            if line.startswith("run_id:"):
                run_id = line.split(":", 1)[1].strip()
                break
        scope = f"{self.host}:{self.port}" if self.cluster_node else ""
        if run_id == _known_run_ids.get(scope):
            return
        previous = _known_run_ids.get(scope)
        for fn in _listeners:
            try:
                await fn(run_id, previous, self)
            except Exception as exc:
                log.warning("redis: new server %s not validated yet (%s)", run_id, exc)
                await self.disconnect()
                raise NewServer(f"Redis server {run_id} is being validated") from exc
        _known_run_ids[scope] = run_id


def _connection_base():
    from redis.asyncio.connection import Connection

    return Connection


def _sentinel_connection_base():
    from redis.asyncio.sentinel import SentinelManagedConnection

    return SentinelManagedConnection


class _ServerCheckedConnection(_RunIdCheck, _connection_base()):
    pass


class _SentinelServerChecked(_RunIdCheck, _sentinel_connection_base()):
    """A connection to the master the Sentinels name now: after a failover, the promoted replica has
    another run id, so the budget counters are checked and rebuilt as after a restart."""


def _ssl_connection_base():
    from redis.asyncio.connection import SSLConnection

    return SSLConnection


class _ClusterServerChecked(_RunIdCheck, _connection_base()):
    """A connection to one node of a cluster: its run id is checked against that node's last."""

    cluster_node = True


class _ClusterSSLServerChecked(_RunIdCheck, _ssl_connection_base()):
    cluster_node = True
