"""The ledger journal: where a ledger row goes when the database cannot take it.

A row whose INSERT fails because the database is unreachable (connection refused, administrator
shutdown, pool timeout: `DB_UNAVAILABLE`) is appended to a local journal instead: JSON lines in
segment files under LEDGER_JOURNAL_DIR, one open segment per process, each append written and
fsync'ed before it returns (off the event loop, in the journal's own thread). The row is then
durable and the request goes on; only if the journal write fails as well does the caller get an
error. Once the database answered a failure, this process journals straight away for
LEDGER_JOURNAL_SKIP_DB_S (no request waits on a dead database), then tries the database again.

`ledger_replay` moves journaled rows into the ledger: it claims a segment with an exclusive,
non-blocking file lock (several processes may replay one directory at once; a writer that finds
its segment claimed starts a new one), inserts its rows idempotently (ON CONFLICT (request_id) DO
NOTHING), recomputes the rollups of the hours the rows fall in, and deletes the segment only after
all that committed. A crash anywhere before the delete leaves the segment to be replayed again,
which inserts nothing twice. It runs:
- in the gateway process, in the background, after a row was journaled (`replay_soon`: backoff,
  bounded attempts), until the journal is empty;
- from Celery beat every LEDGER_REPLAY_EVERY_S (task `analytics.ledger_replay`);
- when a web process or a worker starts (`replay_in_background`);
- by hand: `python manage.py ledger_replay`.
The journal is on local disk: beat and worker start-up replay it only on the host they run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from pathlib import Path

import orjson
import psycopg
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction

from . import metrics

log = logging.getLogger(__name__)

# The database could not be reached or went away: the row itself is fine, journal it.
# (psycopg_pool.PoolTimeout and PoolClosed are psycopg.OperationalError; Django wraps psycopg's.)
DB_UNAVAILABLE = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)

SEGMENT_SUFFIX = ".jsonl"
REJECTED_DIR = "rejected"


def journal_dir() -> Path:
    return Path(settings.LEDGER_JOURNAL_DIR)


def segments(directory: Path | None = None) -> list[Path]:
    """The journal's segment files, oldest first."""
    directory = directory or journal_dir()
    try:
        return sorted(directory.glob(f"*{SEGMENT_SUFFIX}"), key=lambda p: p.name)
    except FileNotFoundError:
        return []


def _dumps(row: dict) -> bytes:
    # Decimals as their exact strings, datetimes in ISO 8601 with their offset.
    return orjson.dumps(row, default=str) + b"\n"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- writing ------------------------------------------------------------------------------------

class _SegmentWriter:
    """This process's open segment. Appends hold an exclusive, non-blocking flock for the write
    and fsync; a segment a replayer holds (or already deleted) is left for a new one."""

    def __init__(self):
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.pid = 0

    def _open(self) -> int:
        if self.fd is not None and self.pid == os.getpid():
            return self.fd
        self.fd = None  # a forked child never writes to its parent's segment
        directory = journal_dir()
        directory.mkdir(parents=True, exist_ok=True)
        name = f"ledger-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}{SEGMENT_SUFFIX}"
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        _fsync_dir(directory)  # the new file's name is durable too
        self.fd, self.pid = fd, os.getpid()
        return fd

    def _rotate(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None

    def append(self, data: bytes) -> None:
        with self.lock:
            for _ in range(5):
                fd = self._open()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a replayer holds it: a new segment
                    self._rotate()
                    continue
                rotate = False
                try:
                    if os.fstat(fd).st_nlink == 0:  # replayed and deleted meanwhile
                        rotate = True
                        continue
                    size = os.lseek(fd, 0, os.SEEK_END)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fsync(fd)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, size)  # no torn line before the next append
                        rotate = True
                        raise
                    rotate = size + len(data) >= settings.LEDGER_JOURNAL_SEGMENT_BYTES
                    return
                finally:
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    if rotate:
                        self._rotate()
            raise OSError("ledger journal: no segment could be locked for writing")


_writer = _SegmentWriter()
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-journal")


def journal_append(rows: list[dict], reason: BaseException | str | None = None) -> None:
    """Append rows to the journal, durably (written and fsync'ed) when it returns; raises if not."""
    if not rows:
        return
    _writer.append(b"".join(_dumps(r) for r in rows))
    metrics.LEDGER_JOURNALED.inc(len(rows))
    log.warning("ledger: %d row(s) journaled to %s (database unavailable: %s); first request_id=%s",
                len(rows), journal_dir(), reason, rows[0].get("request_id"))


class _Group:
    """Rows journaled while others are being written go together in the next append (one fsync)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[list[dict], asyncio.Future]] = []
        self.writer: asyncio.Task | None = None

    async def append(self, rows: list[dict], reason) -> None:
        future = self.loop.create_future()
        self.pending.append((rows, future))
        if self.writer is None:
            self.writer = self.loop.create_task(self._drain(reason))
        await asyncio.shield(future)  # a cancelled request still gets its row journaled

    async def _drain(self, reason) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                rows = [r for rs, _ in batch for r in rs]
                try:
                    await self.loop.run_in_executor(_executor, journal_append, rows, reason)
                except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                    for _, future in batch:
                        future.set_exception(exc)
                else:
                    for _, future in batch:
                        future.set_result(None)
        finally:
            self.writer = None


_group: _Group | None = None


async def journal_rows(rows: list[dict], reason: BaseException | str | None = None) -> None:
    """`journal_append` from async code: off the loop, grouped; then the background replay."""
    global _group
    loop = asyncio.get_running_loop()
    if _group is None or _group.loop is not loop:
        _group = _Group(loop)
    await _group.append(rows, reason)
    replay_soon()


# --- journal first (GATEWAY_LEDGER_WRITER=journal) -------------------------------------------------

PENDING_PREFIX = "pending-"


class _Pending:
    """One segment of rows journaled first: written before their requests are answered, on their
    way to the ledger. Its process holds an exclusive flock on it for as long as it has the segment
    open, so a replay (which claims with a non-blocking flock) leaves it alone while the process
    lives; if the process dies, the lock goes with it and the segment is replayed like any other.
    Its bookkeeping runs on the event loop. The file is opened, fsync'ed and finished in the
    journal's thread; once open, an append without fsync (LEDGER_JOURNAL_FIRST_FSYNC off) is one
    write() on the loop: the bytes are in the page cache, which outlives the process."""

    __slots__ = ("closed", "done", "failed", "fd", "opened", "path", "rows", "size", "synced")

    def __init__(self, opened: float):
        self.fd: int | None = None
        self.path: Path | None = None
        self.opened = opened  # the event loop's time
        self.rows = 0  # appended
        self.done = 0  # of those, in the ledger or left to the replay
        self.size = 0
        self.synced = 0  # bytes known to be fsync'ed
        self.failed = False  # a row did not reach the ledger: the replay takes the segment
        self.closed = False  # no more appends

    def open(self) -> None:
        """In the journal's thread: create, lock, make the name durable."""
        directory = journal_dir()
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{PENDING_PREFIX}{socket.gethostname()}-{os.getpid()}-{time.time_ns()}{SEGMENT_SUFFIX}"
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        self.fd, self.path = fd, directory / name
        _fsync_dir(directory)

    def write(self, data: bytes, *, fsync: bool) -> None:
        """Open on first use (then only in the journal's thread), append, and fsync if asked.
        Raises if the bytes are not written (fsync'ed, if asked); the caller closes the segment."""
        if self.fd is None:
            self.open()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            if fsync:
                os.fdatasync(self.fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # no torn line before the replay reads it
            self.failed = True
            raise
        self.size += len(data)
        if fsync:
            self.synced = self.size

    def sync(self) -> None:
        """In the journal's thread: fsync what was written (a row that will not reach the ledger
        through this process is left to the replay: it must outlive the machine too)."""
        size = self.size
        if self.fd is None or self.synced >= size:
            return
        try:
            os.fdatasync(self.fd)
        except OSError:
            log.exception("ledger: fsync of journal segment %s failed", self.path)
            return
        self.synced = max(self.synced, size)

    def finish(self) -> None:
        """In the journal's thread, once closed and every row is done: deleted when every row is in
        the ledger, otherwise fsync'ed, unlocked and left for the replay."""
        if self.fd is None:
            return
        if not self.failed:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            self.sync()
        with contextlib.suppress(OSError):
            os.close(self.fd)  # releases the lock
        self.fd = None


class _PendingWriter:
    """Journal-first appends of one event loop. Once the segment is open and without
    LEDGER_JOURNAL_FIRST_FSYNC, a row is written at once, on the loop. Otherwise the write goes to
    the journal's thread, and rows that arrive while one is in flight go together in the next (one
    fsync). A segment is closed when it is older than LEDGER_PENDING_SEGMENT_S or bigger than
    LEDGER_JOURNAL_SEGMENT_BYTES, or has had every row done and nothing new for that long."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.current: _Pending | None = None
        self.pending: list[tuple[bytes, asyncio.Future]] = []
        self.writer: asyncio.Task | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.finishing: set[asyncio.Future] = set()

    def _segment(self) -> _Pending:
        """The segment to append to: the current one, or a new one (the current closed)."""
        seg = self.current
        if seg is None or seg.closed or seg.failed or seg.size >= settings.LEDGER_JOURNAL_SEGMENT_BYTES \
                or self.loop.time() - seg.opened >= settings.LEDGER_PENDING_SEGMENT_S:
            if seg is not None:
                self.close(seg)
            seg = self.current = _Pending(self.loop.time())
        return seg

    async def append(self, row: dict) -> _Pending:
        data = _dumps(row)
        if self.writer is None and not settings.LEDGER_JOURNAL_FIRST_FSYNC:
            seg = self._segment()
            if seg.fd is not None:
                try:
                    seg.write(data, fsync=False)
                except OSError:
                    self.close(seg)
                    raise
                seg.rows += 1
                metrics.LEDGER_JOURNALED_FIRST.inc()
                return seg
        future = self.loop.create_future()
        self.pending.append((data, future))
        if self.writer is None:
            self.writer = self.loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        fsync = settings.LEDGER_JOURNAL_FIRST_FSYNC
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                seg = self._segment()
                try:
                    await self.loop.run_in_executor(_executor, partial(seg.write, b"".join(d for d, _ in batch),
                                                                       fsync=fsync))
                except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                    self.close(seg)
                    for _, future in batch:
                        future.set_exception(exc)
                else:
                    seg.rows += len(batch)
                    metrics.LEDGER_JOURNALED_FIRST.inc(len(batch))
                    for _, future in batch:
                        future.set_result(seg)
        finally:
            self.writer = None

    def done(self, seg: _Pending, *, in_ledger: bool) -> None:
        """A row of `seg` is in the ledger, or (in_ledger=False) did not get there: the replay then
        takes its segment, fsync'ed at once (a failed segment takes no more rows: one fsync)."""
        seg.done += 1
        if not in_ledger and not seg.failed:
            seg.failed = True
            self._in_thread(seg.sync)
        if seg.done < seg.rows:
            return
        if seg.closed:
            self._finish(seg)
        elif self.idle is None:
            self.idle = self.loop.call_later(settings.LEDGER_PENDING_SEGMENT_S, self._close_idle)

    def _close_idle(self) -> None:
        self.idle = None
        seg = self.current
        if seg is not None and not seg.closed and seg.done == seg.rows and self.writer is None:
            self.close(seg)

    def close(self, seg: _Pending) -> None:
        if self.current is seg:
            self.current = None
        seg.closed = True
        if seg.done == seg.rows:
            self._finish(seg)

    def _in_thread(self, fn) -> asyncio.Future:
        future = self.loop.run_in_executor(_executor, fn)
        self.finishing.add(future)
        future.add_done_callback(self.finishing.discard)
        return future

    def _finish(self, seg: _Pending) -> None:
        future = self._in_thread(seg.finish)
        if seg.failed:
            future.add_done_callback(lambda _f: replay_soon())

    async def close_all(self) -> None:
        """The server's shutdown: the open segment is closed (deleted if every row is in the ledger)."""
        if self.current is not None:
            self.close(self.current)
        if self.finishing:
            await asyncio.gather(*self.finishing, return_exceptions=True)


_pending_writer: _PendingWriter | None = None


def pending_writer() -> _PendingWriter:
    """This event loop's journal-first writer."""
    global _pending_writer
    loop = asyncio.get_running_loop()
    if _pending_writer is None or _pending_writer.loop is not loop:
        _pending_writer = _PendingWriter(loop)
    return _pending_writer


async def pending_close() -> None:
    """The server's shutdown (and a test's end): close this loop's open journal-first segment."""
    if _pending_writer is not None and _pending_writer.loop is asyncio.get_running_loop():
        await _pending_writer.close_all()


# --- the database is down: journal without trying it --------------------------------------------

_skip_db_until = 0.0


def db_skipped() -> bool:
    """True while this process knows the database is down (journal without waiting on it)."""
    return _skip_db_until != 0.0 and time.monotonic() < _skip_db_until


def db_down() -> None:
    global _skip_db_until
    _skip_db_until = time.monotonic() + settings.LEDGER_JOURNAL_SKIP_DB_S


def db_up() -> None:
    global _skip_db_until
    _skip_db_until = 0.0


# --- replay ------------------------------------------------------------------------------------

def _fields():
    from .models import UsageEvent

    return {f.attname: f for f in UsageEvent._meta.concrete_fields if not f.primary_key}


def _typed(row: dict, fields: dict):
    from .models import UsageEvent

    return UsageEvent(**{k: fields[k].to_python(v) for k, v in row.items()})


def _claim(path: Path):
    """Open and lock a segment for replay, or None (being written, replayed, or gone)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - kept open (and locked) until the segment is deleted
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    if os.fstat(f.fileno()).st_nlink == 0:  # another replayer deleted it before we locked it
        f.close()
        return None
    return f


def _parse(path: Path, data: bytes, rejected: list[bytes]) -> list[dict]:
    rows = []
    lines = data.split(b"\n")
    if lines[-1]:  # no newline: an append torn by a crash, never acknowledged to its request
        log.error("ledger journal %s: ignoring an incomplete last line (%d bytes)", path.name, len(lines[-1]))
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            rejected.append(line)
    return rows


def _insert(rows: list[dict], rejected: list[bytes]) -> list:
    """Insert rows idempotently; rows the database refuses (not unavailable: a bad row) and rows
    of a tenant that no longer exists (the ledger has no foreign-key constraints; the rollups
    have, and one such row would fail its hour's recompute) are set aside in `rejected`. Returns
    the rows' model objects that were inserted or already there."""
    from django.core.exceptions import ValidationError

    from apps.keys.models import Tenant

    from .models import UsageEvent

    fields, objs = _fields(), []
    for row in rows:
        try:
            objs.append((row, _typed(row, fields)))
        except (ValidationError, TypeError, ValueError, KeyError):
            rejected.append(orjson.dumps(row))
    tenants = set(Tenant.objects.filter(id__in={o.tenant_id for _, o in objs}).values_list("id", flat=True))
    rejected.extend(orjson.dumps(row) for row, o in objs if o.tenant_id not in tenants)
    objs = [(row, o) for row, o in objs if o.tenant_id in tenants]
    def insert(batch):
        # A bad foreign key must fail here, not at a COMMIT that an enclosing transaction delays.
        nested = connection.in_atomic_block
        with transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cur:
                    cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
            UsageEvent.objects.insert_new(batch, batch_size=500)
            if nested and connection.vendor == "sqlite":
                connection.check_constraints(table_names=[UsageEvent._meta.db_table])

    try:
        insert([o for _, o in objs])
        return [o for _, o in objs]
    except DB_UNAVAILABLE:
        raise
    except DatabaseError:  # one bad row: one by one, so only it is set aside
        kept = []
        for row, obj in objs:
            try:
                insert([obj])
                kept.append(obj)
            except DB_UNAVAILABLE:
                raise
            except DatabaseError:
                rejected.append(orjson.dumps(row))
        return kept


def ledger_replay(*, directory: Path | None = None, max_segments: int = 200, rollups: bool = True) -> dict:
    """Replay journal segments into the ledger (see the module's docstring). Raises one of
    DB_UNAVAILABLE if the database is still down (the segments stay). Returns counts: segments
    and rows replayed, rows rejected (kept under rejected/ for an operator), segments left."""
    from .services import usage_rollup_recompute

    directory = directory or journal_dir()
    claimed, rejected, rows = [], [], []
    try:
        for path in segments(directory):
            if len(claimed) >= max_segments:
                break
            f = _claim(path)
            if f is not None:
                claimed.append((path, f))
                rows.extend(_parse(path, f.read(), rejected))
        if not claimed:
            return {"segments": 0, "rows": 0, "rejected": 0, "left": len(segments(directory))}
        objs = _insert(rows, rejected) if rows else []
        if objs and rollups:  # the rollups of the replayed rows' hours, whatever their age
            stamps = [o.timestamp for o in objs]
            usage_rollup_recompute(since=min(stamps), until=max(stamps) + timedelta(microseconds=1))
        if rejected:
            out = directory / REJECTED_DIR
            out.mkdir(exist_ok=True)
            name = out / f"{claimed[0][0].stem}-{time.time_ns()}{SEGMENT_SUFFIX}"
            with open(name, "wb") as r:
                r.write(b"".join(line + b"\n" for line in rejected))
                r.flush()
                os.fsync(r.fileno())
            metrics.LEDGER_REJECTED.inc(len(rejected))
            log.error("ledger journal: %d row(s) the database refused, kept in %s", len(rejected), name)
        for path, _f in claimed:  # only now: every row is committed (or set aside)
            path.unlink()
        _fsync_dir(directory)
    finally:
        for _path, f in claimed:
            f.close()
    metrics.LEDGER_REPLAYED.inc(len(objs))
    log.warning("ledger journal: replayed %d row(s) from %d segment(s)", len(objs), len(claimed))
    return {"segments": len(claimed), "rows": len(objs), "rejected": len(rejected),
            "left": len(segments(directory))}


def _replay_in_thread() -> dict:
    try:
        return ledger_replay()
    finally:
        connection.close()  # this thread's connection goes back (the pool) or is closed


_replay_task: asyncio.Task | None = None


def replay_soon() -> None:
    """In the ASGI server's loop: start the background replay unless it runs already. Elsewhere
    (short-lived loops of tasks and tests) beat and start-up replay the journal."""
    from apps.core import db

    global _replay_task
    loop = asyncio.get_running_loop()
    if loop is not db._server_loop:
        return
    if _replay_task is not None and not _replay_task.done():
        return
    _replay_task = loop.create_task(_replay_loop())


async def _replay_loop() -> None:
    loop = asyncio.get_running_loop()
    delay = settings.LEDGER_REPLAY_BACKOFF_S
    for _ in range(settings.LEDGER_REPLAY_ATTEMPTS):
        await asyncio.sleep(delay)
        try:
            result = await loop.run_in_executor(None, _replay_in_thread)
        except DB_UNAVAILABLE as exc:
            db_down()
            log.warning("ledger journal: replay failed, database still unavailable (%s)", exc)
            delay = min(delay * 2, settings.LEDGER_REPLAY_BACKOFF_MAX_S)
            continue
        except Exception:
            log.exception("ledger journal: replay failed")
            delay = min(delay * 2, settings.LEDGER_REPLAY_BACKOFF_MAX_S)
            continue
        db_up()
        if not result["left"] or not result["segments"]:  # done, or only segments their writers hold
            return
        delay = settings.LEDGER_REPLAY_BACKOFF_S


def replay_in_background(reason: str) -> threading.Thread | None:
    """At start-up: replay what the journal holds (if anything) in a daemon thread."""
    if not segments():
        return None

    def run():
        try:
            result = _replay_in_thread()
            log.warning("ledger journal: replay at %s: %s", reason, result)
        except Exception:
            log.exception("ledger journal: replay at %s failed (beat will retry)", reason)

    thread = threading.Thread(target=run, name="ledger-replay", daemon=True)
    thread.start()
    return thread
