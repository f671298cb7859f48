"""Drills: PostgreSQL stops under streaming load, then comes back; a gateway is killed between
its answers and their ledger commits.

The test runs its OWN PostgreSQL cluster (initdb in a temp dir, its own port; never the shared one),
migrates it and loads a tenant, key and model through the command line, starts a gateway process
(uvicorn) on it with the fake OpenAI upstream, and stops the cluster (`pg_ctl stop -m fast`) while
streams are in flight. Every stream that got 200 must end with [DONE] (its ledger row durable: in
the database or the local journal), and once the database is back and the gateway replayed its
journal, every 200 has exactly one ledger row.

The second drill holds the ledger's inserts back (a transaction locks the ledger table), gets
answers from the gateway (their rows are in its local journal, GATEWAY_LEDGER_WRITER=journal),
kills the gateway process (SIGKILL), and replays the journal as a restarted gateway or beat would:
every 200 has exactly one ledger row.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from django.conf import settings

from apps.analytics.models import UsageEvent

DB_NAME = "llm_drill"
ALIAS = "drill-model"
DRIP_MS = 250  # per content word: a stream lasts ~2 s, long enough to end while the database is down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL cluster. initdb refuses to run as root: then it runs as `postgres`."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")]
                                                                        if shutil.which("initdb") else [])
        if not bins:
            pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
        self.bin = Path(bins[-1]).parent
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no `postgres` user to run initdb as")
            if not shutil.which("runuser"):
                pytest.skip("running as root and there is no runuser to run initdb as `postgres`")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="ledger-drill-"))
        if self.as_user:
            shutil.chown(self.dir, user="postgres")
        self.data = self.dir / "data"
        self.port = _free_port()

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=120, check=False)

    def init(self) -> None:
        out = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                        "--locale=C", "--no-sync")
        if out.returncode:
            pytest.skip(f"initdb failed here: {out.stderr.strip()[-300:]}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        out = self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        assert out.returncode == 0, out.stdout + out.stderr

    def stop(self, mode: str = "fast") -> None:
        out = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        assert out.returncode == 0, out.stdout + out.stderr

    def url(self, db: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str = DB_NAME) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=db, autocommit=True)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster():
    pg = PgCluster()
    try:
        pg.init()
        pg.start()
        with pg.connect("postgres") as conn:
            conn.execute(f"CREATE DATABASE {DB_NAME}")
        yield pg
    finally:
        pg.destroy()


def _manage(env: dict, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([sys.executable, "manage.py", *args], env=env, cwd=str(settings.BASE_DIR),
                         capture_output=True, text=True, timeout=300, input=stdin, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


CONFIG = """
providers:
  - {{name: drill-openai, kind: openai_compatible, api_base: "{base}", api_key_env: DRILL_UPSTREAM_KEY}}
models:
  - alias: {alias}
    input_usd_per_mtok: 1.5
    output_usd_per_mtok: 6
    deployments:
      - {{provider: drill-openai, model: drip-{drip}, weight: 1, priority: 0}}
tenants:
  - slug: drill
    name: Drill
    sources: [{{name: app, type: application}}]
"""


@pytest.fixture
def gateway(cluster, fake_openai_server, tmp_path):
    """A gateway process on the drill cluster, with its ledger journal in tmp_path/journal."""
    journal = tmp_path / "journal"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": cluster.url(DB_NAME),
           "REDIS_URL": settings.REDIS_URL or "", "LEDGER_JOURNAL_DIR": str(journal),
           "DRILL_UPSTREAM_KEY": "sk-drill",
           # fail fast while the database is down, replay soon after it is back
           "GATEWAY_PG_POOL_TIMEOUT_S": "2", "DB_POOL_TIMEOUT": "2", "DB_POOL_MIN": "0",
           "LEDGER_REPLAY_BACKOFF_S": "0.5", "LEDGER_REPLAY_BACKOFF_MAX_S": "2"}
    _manage(env, "migrate", "--noinput", "-v0")
    config = tmp_path / "drill.yaml"
    config.write_text(CONFIG.format(base=fake_openai_server.base_url, alias=ALIAS, drip=DRIP_MS))
    _manage(env, "gateway_apply", str(config))
    key = _manage(env, "key_create", "--tenant", "drill", "--source", "app", "--cache", "off").strip()

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", "--lifespan", "off"],
                            env=env, cwd=str(settings.BASE_DIR))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the gateway process exited"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the gateway process did not start"
            time.sleep(0.1)
        yield {"url": url, "key": key, "journal": journal, "proc": proc, "env": env}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _stream(client: httpx.AsyncClient, gw: dict, tag: str, headers_in: asyncio.Event | None = None) -> dict:
    body = {"model": ALIAS, "stream": True,
            "messages": [{"role": "user", "content": f"drill {tag} {uuid.uuid4().hex[:8]} one two three four"}]}
    out = {"tag": tag, "status": None, "request_id": None, "body": b""}
    try:
        async with client.stream("POST", f"{gw['url']}/v1/chat/completions", json=body,
                                 headers={"authorization": f"Bearer {gw['key']}"}) as resp:
            out["status"], out["request_id"] = resp.status_code, resp.headers.get("x-request-id")
            if headers_in is not None:
                headers_in.set()
            async for chunk in resp.aiter_bytes():
                out["body"] += chunk
    except httpx.HTTPError as exc:  # a broken stream is recorded as such, and judged below
        out["error"] = repr(exc)
    finally:
        if headers_in is not None:
            headers_in.set()
    return out


def _ended_with_done(r: dict) -> bool:
    return r["body"].rstrip().endswith(b"data: [DONE]") and b'"error"' not in r["body"]


def _rows_by_request_id(cluster: PgCluster, ids: list[str]) -> dict[str, int]:
    table = UsageEvent._meta.db_table
    with cluster.connect() as conn:
        got = conn.execute(f'SELECT request_id, count(*) FROM "{table}" WHERE request_id = ANY(%s) '  # noqa: S608
                           "GROUP BY request_id", [ids]).fetchall()
    return dict(got)


@pytest.mark.skipif(not settings.IS_POSTGRES, reason="a PostgreSQL outage drill (the suite runs on SQLite)")
def test_postgres_stopped_under_streaming_load_loses_no_ledger_row(cluster, gateway):
    gw = gateway
    wave_size = 12

    async def drill() -> tuple[list[dict], int]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60), limits=limits) as client:
            warm = await asyncio.gather(*(_stream(client, gw, f"warm{i}") for i in range(3)))
            assert all(r["status"] == 200 and _ended_with_done(r) for r in warm), warm

            # Streams in flight, their 200 sent: then the database stops under them.
            events = [asyncio.Event() for _ in range(wave_size)]
            wave_a = [asyncio.create_task(_stream(client, gw, f"a{i}", ev)) for i, ev in enumerate(events)]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in events)), 60)
            await asyncio.to_thread(cluster.stop, "fast")
            # More requests while it is down: whatever status they get, a 200 must be accounted for.
            wave_b = [asyncio.create_task(_stream(client, gw, f"b{i}")) for i in range(6)]
            done_a = await asyncio.wait_for(asyncio.gather(*wave_a), 120)
            done_b = await asyncio.wait_for(asyncio.gather(*wave_b), 120)
            journaled = sum(len(p.read_bytes().splitlines()) for p in gw["journal"].glob("*.jsonl"))

            await asyncio.to_thread(cluster.start)
            done_c = await asyncio.gather(*(_stream(client, gw, f"c{i}") for i in range(6)))
            return warm + done_a + done_b + done_c, journaled

    results, journaled = asyncio.run(drill())

    wave_a = [r for r in results if r["tag"].startswith("a")]
    assert all(r["status"] == 200 for r in wave_a), [(r["tag"], r["status"], r.get("error")) for r in wave_a]
    assert journaled >= 1, "no ledger row was written while the database was down: the drill missed the outage"
    ok = [r for r in results if r["status"] == 200]
    broken = [(r["tag"], r.get("error"), r["body"][-200:]) for r in ok if not _ended_with_done(r)]
    assert broken == [], "streams that got 200 must end with [DONE] (their row is durable)"

    ids = [r["request_id"] for r in ok]
    assert len(set(ids)) == len(ids)
    deadline = time.monotonic() + 90  # the gateway's background replay, with backoff
    while True:
        rows = _rows_by_request_id(cluster, ids)
        left = list(gw["journal"].glob("*.jsonl"))
        if len(rows) == len(ids) and not left:
            break
        assert time.monotonic() < deadline, (f"after the outage {len(ids) - len(rows)} of {len(ids)} 2xx have no "
                                             f"ledger row; journal segments left: {left}")
        time.sleep(0.2)
    assert set(rows) == set(ids)
    assert set(rows.values()) == {1}, "exactly one ledger row per request id"
    assert not list((gw["journal"] / "rejected").glob("*")), "no journaled row was refused"


@pytest.mark.skipif(not settings.IS_POSTGRES, reason="a PostgreSQL drill (the suite runs on SQLite)")
def test_a_gateway_killed_after_its_answers_and_before_their_commits_loses_no_ledger_row(cluster, gateway):
    gw = gateway
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "drill: one two three"}], "max_tokens": 20}
    headers = {"authorization": f"Bearer {gw['key']}"}
    table = UsageEvent._meta.db_table

    async def calls(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
            return await asyncio.gather(*(client.post(f"{gw['url']}/v1/chat/completions", json=body,
                                                      headers=headers) for _ in range(n)))

    warm = asyncio.run(calls(2))
    assert [r.status_code for r in warm] == [200, 200]

    with cluster.connect() as lock, lock.transaction():
        lock.execute(f'LOCK TABLE "{table}" IN SHARE ROW EXCLUSIVE MODE')  # inserts wait; reads do not
        answers = asyncio.run(calls(8))
        assert [r.status_code for r in answers] == [200] * 8
        ids = [r.headers["x-request-id"] for r in answers]
        assert _rows_by_request_id(cluster, ids) == {}, "the answers came before their rows were committed"
        gw["proc"].kill()
        gw["proc"].wait(10)

    assert list(gw["journal"].glob("*.jsonl")), "the rows are in the dead gateway's journal"
    _manage(gw["env"], "ledger_replay")

    rows = _rows_by_request_id(cluster, ids + [r.headers["x-request-id"] for r in warm])
    assert rows == dict.fromkeys(ids + [r.headers["x-request-id"] for r in warm], 1)
    assert list(gw["journal"].glob("*.jsonl")) == []
    assert not list((gw["journal"] / "rejected").glob("*"))
