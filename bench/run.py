"""`make bench`: requests/s and latency of the gateway against a fast fake upstream, in production
mode (PostgreSQL + Redis, uvicorn with N workers), driven by wrk.

Measures, for each connection count (default 1 and 32), the fake upstream called directly and the
same request through the gateway (auth, route, admission, provider call, settle, ledger row), then
prints a table and writes var/bench-results.json. Everything runs on 127.0.0.1, and every process
the script starts is stopped when it ends (also on Ctrl-C or an error).

    .venv/bin/python bench/run.py                      # the standard run (about a minute)
    .venv/bin/python bench/run.py --label httpx --gateway-env GATEWAY_HTTP_TRANSPORT=httpx --connections 32
    .venv/bin/python bench/run.py --help

The environment's DATABASE_URL / REDIS_URL / CELERY_BROKER_URL are used when set; otherwise the
bench's own database (llm_bench) and Redis DBs 11/12. The bench tenant's ledger rows are deleted
at the start of each run so the ledger check can count them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import peers  # bench/peers.py (this script's directory is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VAR = ROOT / "var"
PYTHON = sys.executable
DEFAULT_ENV = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/llm_bench",
    "REDIS_URL": "redis://127.0.0.1:6379/11",
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/12",
}
TENANT = "bench"
ALIAS = "bench-model"
UPSTREAM_SECRET_ENV = "BENCH_UPSTREAM_KEY"
TARGETS = {"p50_added_ms_1conn": 1.5, "gateway_rps_32conn": 900}
# Issue 14's targets, as ratios to the peers measured in the same run.
PEER_TARGETS = {"rps_over_portkey": 1.0, "rps_over_litellm": 4.0, "added_p50_over_portkey": 1.5}
UPSTREAM_CONTENT = "Echo: hello from the benchmark"  # bench/upstream.py's answer


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.05)


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    log("wrk not found: apt-get install -y wrk")
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, stdout=subprocess.DEVNULL)
    path = shutil.which("wrk")
    if not path:
        raise SystemExit("wrk is required (Debian package `wrk`)")
    return path


def ensure_database(url: str) -> None:
    if not url.startswith(("postgres://", "postgresql://")):
        return
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    info = conninfo_to_dict(url)
    name = info.get("dbname")
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            log(f"creating database {name}")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


class Processes:
    """Children started in their own process groups, all stopped on exit."""

    def __init__(self, nice: int = 0):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.nice = nice

    def start(self, name: str, argv: list[str], env: dict, logfile: Path) -> subprocess.Popen:
        out = open(logfile, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_niceness(self.nice))
        out.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # uvicorn's worker processes share the group: make sure none is left behind.
        for _name, proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


def django_setup(env: dict, upstream_base: str, features: str = "all", request_log: bool = False) -> str:
    """Migrate, apply the bench config, clear the bench ledger, create a key; returns its secret."""
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", "--noinput", verbosity=0)
    if env.get("REDIS_URL") == DEFAULT_ENV["REDIS_URL"]:
        # The bench's own Redis DB: start without an earlier run's cooldowns, windows or counters.
        import redis

        redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    # gateway_apply adds and updates but never deletes: start from no limits and budgets.
    from apps.analytics.models import RequestLogPolicy
    from apps.billing.models import Budget
    from apps.gateway.models import RateLimit

    Budget.objects.filter(tenant__slug=TENANT).delete()
    RateLimit.objects.filter(tenant__slug=TENANT).delete()
    RequestLogPolicy.objects.filter(tenant__slug=TENANT).delete()
    config = f"""\
providers:
  - name: bench-upstream
    kind: openai_compatible
    api_base: {upstream_base}
    api_key_env: {UPSTREAM_SECRET_ENV}
models:
  - alias: {ALIAS}
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    deployments:
      - {{provider: bench-upstream, model: bench-up, weight: 1, priority: 0}}
tenants:
  - slug: {TENANT}
    name: Benchmark
    sources: [{{name: bench-app, type: application}}]
"""
    if features == "all":
        # Every admission feature on, so the one-round-trip admission and settle are measured too:
        # limits and a hard budget far above what a run uses, and a key with its own RPM.
        config += """\
    rate_limits: [{scope: tenant, rpm: 100000000, tpm: 1000000000}, {scope: "source:bench-app", rpm: 100000000}]
    budgets:
      - {name: bench-monthly, scope: tenant, limit_usd: 1000000, period: monthly, enforcement: hard,
         alert_thresholds: [0.5, 0.8, 1.0]}
"""
    if request_log:  # every request logged with its bodies (issue 12's cost)
        config += """\
    request_log: {bodies: true, retention_days: 1}
"""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=VAR, delete=False) as fh:
        fh.write(config)
    try:
        call_command("gateway_apply", fh.name, stdout=io.StringIO())
    finally:
        os.unlink(fh.name)
    ledger_clear()
    out = io.StringIO()
    key_args = ["--rpm", "100000000", "--tpm", "1000000000"] if features == "all" else []
    call_command("key_create", "--tenant", TENANT, "--source", "bench-app",
                 "--name", f"bench-{int(time.time() * 1000)}", *key_args, stdout=out)
    return out.getvalue().strip()


def ledger_clear() -> None:
    from apps.analytics.models import UsageEvent

    UsageEvent.objects.filter(tenant__slug=TENANT).delete()


def ledger_catch_up() -> None:
    """Rows on their way to the ledger, there now, so the ledger check can count them: with
    GATEWAY_LEDGER_WRITER=redis-stream the stream's rows (the Celery task's job in production); and
    rows a stopped gateway left in its local journal (journal first, the default: the bench's
    uvicorn runs without the lifespan shutdown that commits them), replayed as its next start would."""
    from django.conf import settings

    if getattr(settings, "GATEWAY_LEDGER_WRITER", "") == "redis-stream":
        from apps.analytics.services import ledger_stream_drain

        while ledger_stream_drain():
            pass
    from apps.analytics.journal import ledger_replay

    while ledger_replay()["segments"]:
        pass


def ledger_count(status: int | None = None) -> int:
    from apps.analytics.models import UsageEvent

    qs = UsageEvent.objects.filter(tenant__slug=TENANT)
    if status is not None:
        qs = qs.filter(status=status)
    return qs.count()


CLK_TCK = os.sysconf("SC_CLK_TCK")
NICE = 0  # set from --nice: the priority of every process the bench starts, wrk included


def _niceness(n: int):
    return (lambda: os.nice(n)) if n else None


def groups_cpu_seconds(pgids) -> dict[int, float]:
    """User + system CPU time of every live process in each process group (a server and its workers)."""
    pgids = set(pgids)
    totals = dict.fromkeys(pgids, 0)
    if not pgids:
        return {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        pgid = int(fields[2])
        if pgid in totals:
            totals[pgid] += int(fields[11]) + int(fields[12])
    return {pgid: ticks / CLK_TCK for pgid, ticks in totals.items()}


def group_cpu_seconds(pgid: int) -> float:
    return groups_cpu_seconds([pgid])[pgid]


def run_wrk(wrk: str, url: str, *, connections: int, duration: float, key: str = "", pgid: int | None = None,
            headers: dict[str, str] | None = None, idle: dict[str, int] | None = None) -> dict:
    """One wrk run. `pgid`: the server under test (its CPU per request is reported); `idle`: the other
    servers left running meanwhile (their CPU seconds during the run are reported, should be ~0)."""
    watched = {pgid} if pgid else set()
    watched |= set((idle or {}).values())
    cpu_before = groups_cpu_seconds(watched)
    load_before = os.getloadavg()[0]
    threads = 1 if connections < 8 else 2
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(BENCH / "post.lua"), url]
    env = {**os.environ, "BENCH_KEY": key,
           "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 30, check=False,
                          preexec_fn=_niceness(NICE))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    r = json.loads(line.removeprefix("BENCH_JSON "))
    cpu_after = groups_cpu_seconds(watched)
    cpu = cpu_after[pgid] - cpu_before[pgid] if pgid else 0.0
    errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"] + r["non_2xx"]
    out = {
        "connections": connections,
        "requests": r["requests"],
        "ok": r["requests"] - r["non_2xx"],
        "errors": errors,
        "rps": round(r["requests"] / (r["duration_us"] / 1e6), 1),
        "p50_ms": round(r["p50_us"] / 1000, 3),
        "p90_ms": round(r["p90_us"] / 1000, 3),
        "p99_ms": round(r["p99_us"] / 1000, 3),
        "mean_ms": round(r["mean_us"] / 1000, 3),
        # CPU time the server under test spent per request: less sensitive to other load on the
        # machine than requests/s, so the better figure for comparing variants.
        "server_cpu_ms_per_req": round(cpu * 1000 / r["requests"], 3) if pgid and r["requests"] else None,
        "loadavg_1m_before": round(load_before, 2),
    }
    if idle:
        out["idle_servers_cpu_s"] = {name: round(cpu_after[g] - cpu_before[g], 3) for name, g in idle.items()}
    return out


def settle(pgids: list[int], *, limit: float = 15.0, idle_share: float = 0.05) -> float:
    """Wait until the servers are idle again (below `idle_share` of a core over 0.25 s), at most
    `limit` seconds: a server still working through the requests wrk left in flight (LiteLLM at 32
    connections) would otherwise take CPU from the next system's turn. Returns the seconds waited."""
    start = time.monotonic()
    before = groups_cpu_seconds(pgids)
    while time.monotonic() - start < limit:
        time.sleep(0.25)
        after = groups_cpu_seconds(pgids)
        if sum(after.values()) - sum(before.values()) < idle_share * 0.25:
            break
        before = after
    return round(time.monotonic() - start, 2)


def _interrupt(*_):
    raise KeyboardInterrupt


def parse_kv(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--gateway-env expects KEY=VALUE, got {item!r}")
        out[k] = v
    return out


def post_json(url: str, body: dict, headers: dict[str, str], timeout: float = 30) -> dict:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def check_answer(name: str, url: str, headers: dict[str, str], expect: str | None) -> None:
    """One request first: a wrong setup should fail loudly, not as a table of errors. With the fast
    upstream the content is its fixed answer, which proves the request went through to it."""
    body = post_json(url, {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}]}, headers)
    content = body["choices"][0]["message"]["content"]
    if not content or (expect is not None and content != expect):
        raise RuntimeError(f"{name} answered {body!r}, not the upstream's completion")
    log(f"{name} answers through the upstream")


def peer_up(name: str, proc: subprocess.Popen, url: str) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"{name} exited with {proc.returncode}: see var/bench-{name}.log")
    return http_ok(url)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarise(runs: list[dict]) -> dict[int, dict]:
    """Median over the rounds of each figure, per connection count."""
    out: dict[int, dict] = {}
    for c in sorted({r["connections"] for r in runs}):
        rs = [r for r in runs if r["connections"] == c]
        out[c] = {"runs": len(rs), "errors": sum(r["errors"] for r in rs)}
        for k in ("rps", "p50_ms", "p99_ms", "added_p50_ms", "server_cpu_ms_per_req"):
            out[c][k] = median([r[k] for r in rs if r.get(k) is not None])
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def peer_ratios(systems: dict[str, list[dict]], summary: dict[str, dict]) -> dict:
    """The ratios issue 14's targets are written in, from the medians, and round by round."""

    def fig(system: str, c: int, key: str) -> float | None:
        return summary.get(system, {}).get(c, {}).get(key)

    def per_round(system: str, c: int, key: str) -> list[float | None]:
        gw = {r["round"]: r.get(key) for r in systems.get("gateway", []) if r["connections"] == c}
        return [ratio(gw.get(r["round"]), r.get(key)) for r in systems.get(system, []) if r["connections"] == c]

    out = {}
    if "portkey" in systems:
        out["rps_gateway_over_portkey_32conn"] = {
            "value": ratio(fig("gateway", 32, "rps"), fig("portkey", 32, "rps")),
            "per_round": per_round("portkey", 32, "rps"), "target_min": PEER_TARGETS["rps_over_portkey"]}
    if "litellm" in systems:
        out["rps_gateway_over_litellm_32conn"] = {
            "value": ratio(fig("gateway", 32, "rps"), fig("litellm", 32, "rps")),
            "per_round": per_round("litellm", 32, "rps"), "target_min": PEER_TARGETS["rps_over_litellm"]}
    if "portkey" in systems:
        out["added_p50_gateway_over_portkey_1conn"] = {
            "value": ratio(fig("gateway", 1, "added_p50_ms"), fig("portkey", 1, "added_p50_ms")),
            "per_round": per_round("portkey", 1, "added_p50_ms"),
            "target_max": PEER_TARGETS["added_p50_over_portkey"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per target (default 3)")
    p.add_argument("--connections", default="1,32", help="comma-separated connection counts (default 1,32)")
    p.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                   help="the gateway's ASGI server (default uvicorn; granian: --loop applies, --http does not)")
    p.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    p.add_argument("--loop", default="uvloop", help="uvicorn --loop (default uvloop)")
    p.add_argument("--http", default="httptools", help="uvicorn --http (default httptools)")
    p.add_argument("--upstream", choices=["fast", "aiohttp"], default="fast",
                   help="fast: bench/upstream.py (default); aiohttp: tests/fakes/openai_server.py")
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the gateway (repeatable), e.g. GATEWAY_HTTP_TRANSPORT=httpx")
    p.add_argument("--skip-direct", action="store_true", help="measure only through the gateway (and peers)")
    p.add_argument("--features", choices=["all", "none"], default="all",
                   help="all (default): rate limits on key, source and tenant plus a hard budget, so admission "
                        "runs; none: no limits or budgets")
    p.add_argument("--request-log", action="store_true",
                   help="the bench tenant logs every request with its bodies (request logs on)")
    p.add_argument("--peers", default="",
                   help=f"comma-separated peers measured in alternating turns with the gateway: "
                        f"{','.join(peers.KNOWN)} (installed under var/peers/ at pinned versions)")
    p.add_argument("--rounds", type=int, default=None,
                   help="turns of every system at every connection count (default 3 with --peers, else 1)")
    p.add_argument("--litellm-workers", type=int, default=2, help="LiteLLM --num_workers (default 2)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the processes the bench starts (e.g. -10 when other work shares the machine)")
    p.add_argument("--label", default="", help="name of this variant; results go to var/bench-results-LABEL.json")
    p.add_argument("--out", help="results file (default var/bench-results.json, or -LABEL.json)")
    args = p.parse_args()

    global NICE
    NICE = args.nice
    VAR.mkdir(exist_ok=True)
    conns = [int(c) for c in args.connections.split(",") if c.strip()]
    peer_names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in peer_names if n not in peers.KNOWN]
    if unknown or len(set(peer_names)) != len(peer_names):
        raise SystemExit(f"--peers: expected some of {','.join(peers.KNOWN)}, got {args.peers!r}")
    rounds = args.rounds or (3 if peer_names else 1)
    wrk = ensure_wrk()
    peers.install(peer_names)  # before anything starts: a failed install leaves nothing running
    base_env = {k: os.environ.get(k) or v for k, v in DEFAULT_ENV.items()}
    ensure_database(base_env["DATABASE_URL"])
    extra = parse_kv(args.gateway_env)
    up_port, gw_port = free_port(), free_port()
    upstream_base = f"http://127.0.0.1:{up_port}/v1"
    # The bench's own ledger journal: what is left in it belongs to the bench's database.
    child_env = {**os.environ, **base_env, UPSTREAM_SECRET_ENV: peers.UPSTREAM_KEY, "DEBUG": "false",
                 "LOG_LEVEL": "WARNING", "PYTHONDONTWRITEBYTECODE": "1",
                 "LEDGER_JOURNAL_DIR": str(VAR / "bench-ledger-journal"), **extra}
    key = django_setup(child_env, upstream_base, args.features, args.request_log)

    procs = Processes(nice=args.nice)
    signal.signal(signal.SIGTERM, _interrupt)
    # Every system measured, in turn order: name -> (url, key, headers, process group).
    systems: dict[str, dict] = {}
    results: dict[str, list[dict]] = {}
    peer_info: dict[str, dict] = {}
    try:
        up_argv = ([PYTHON, str(BENCH / "upstream.py"), "--port", str(up_port)] if args.upstream == "fast"
                   else [PYTHON, "-m", "tests.fakes.openai_server", "--port", str(up_port)])
        up = procs.start("upstream", up_argv, child_env, VAR / "bench-upstream.log")
        wait_for(lambda: socket.create_connection(("127.0.0.1", up_port), 1).close() is None, "upstream")

        if args.server == "granian":  # `asginl`: ASGI without lifespan events (the app has none)
            gw_argv = [str(Path(PYTHON).parent / "granian"), "--interface", "asginl", "--host", "127.0.0.1",
                       "--port", str(gw_port), "--workers", str(args.workers), "--loop", args.loop,
                       "--no-access-log", "--log-level", "warning", "config.asgi:application"]
        else:
            gw_argv = [str(Path(PYTHON).parent / "uvicorn"), "config.asgi:application", "--host", "127.0.0.1",
                       "--port", str(gw_port), "--workers", str(args.workers), "--loop", args.loop,
                       "--http", args.http, "--no-access-log", "--log-level", "warning", "--lifespan", "off"]
        gw_proc = procs.start("gateway", gw_argv, child_env, VAR / "bench-gateway.log")
        gw = f"http://127.0.0.1:{gw_port}"
        if not args.skip_direct:
            systems["direct"] = {"url": f"{upstream_base}/chat/completions", "key": "", "headers": {},
                                 "pgid": up.pid}
        systems["gateway"] = {"url": f"{gw}/v1/chat/completions", "key": key, "headers": {}, "pgid": gw_proc.pid}
        # Start every peer before waiting for any: LiteLLM takes its time.
        started = []
        for name in peer_names:
            peer = peers.build(name, free_port(), upstream_base, litellm_workers=args.litellm_workers)
            proc = procs.start(name, peer.argv, peer.env, VAR / f"bench-{name}.log")
            started.append((peer, proc))
            peer_info[name] = {"version": peer.version, "describe": peer.describe, "headers": sorted(peer.headers)}
        wait_for(lambda: http_ok(f"{gw}/healthz"), "gateway", timeout=60)
        expect = UPSTREAM_CONTENT if args.upstream == "fast" else None
        check_answer("gateway", systems["gateway"]["url"], {"authorization": f"Bearer {key}"}, expect)
        for peer, proc in started:
            wait_for(lambda peer=peer, proc=proc: peer_up(peer.name, proc, peer.health_url), peer.name,
                     timeout=peer.startup_timeout)
            check_answer(peer.name, peer.chat_url, peer.headers, expect)
            systems[peer.name] = {"url": peer.chat_url, "key": "", "headers": peer.headers, "pgid": proc.pid}
        results = {name: [] for name in systems}
        servers = {name: s["pgid"] for name, s in systems.items() if name != "direct"}

        def measure(name: str, c: int, duration: float) -> dict:
            s = systems[name]
            idle = {n: g for n, g in servers.items() if n != name} if len(servers) > 1 else None
            r = run_wrk(wrk, s["url"], connections=c, duration=duration, key=s["key"], headers=s["headers"],
                        pgid=s["pgid"], idle=idle)
            r["settle_s"] = settle(list(servers.values()))
            return r

        if args.warmup > 0:
            log(f"warm-up {args.warmup:g} s per system: {', '.join(systems)}")
            for name in systems:
                measure(name, 32, args.warmup)
        ledger_catch_up()
        ledger_clear()

        # Alternating turns: every system at one connection count, then the next, round after round,
        # so slow drifts of the machine's load fall on all of them alike.
        for rnd in range(1, rounds + 1):
            for c in conns:
                for name in systems:
                    log(f"round {rnd}/{rounds} {name:<8} c={c:<3} {args.duration:g} s")
                    results[name].append({"round": rnd, **measure(name, c, args.duration)})
    finally:
        procs.stop_all()

    # Ledger check: every 2xx the load generator saw has its row (the gateway may have written rows
    # for a few more requests that wrk cut off at the end of a run).
    ledger_catch_up()
    ok_responses = sum(r["ok"] for r in results.get("gateway", []))
    rows_ok = ledger_count(status=200)
    direct_p50 = {(r["round"], r["connections"]): r["p50_ms"] for r in results.get("direct", [])}
    for name, runs in results.items():
        if name == "direct":
            continue
        for r in runs:
            d = direct_p50.get((r["round"], r["connections"]))
            if d is not None:
                r["added_p50_ms"] = round(r["p50_ms"] - d, 3)
    summary = {name: summarise(runs) for name, runs in results.items()}
    report = {
        "label": args.label or "default",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "config": {"duration_s": args.duration, "rounds": rounds, "nice": args.nice, "server": args.server,
                   "workers": args.workers,
                   "loop": args.loop, "http": args.http,
                   "upstream": args.upstream, "features": args.features, "gateway_env": extra,
                   "database": base_env["DATABASE_URL"].split("://")[0], "peers": peer_names},
        "direct": results.get("direct", []),
        "gateway": results.get("gateway", []),
        "peers": {name: {**peer_info[name], "runs": results.get(name, [])} for name in peer_names},
        "summary": {name: {str(c): v for c, v in s.items()} for name, s in summary.items()},
        "ledger": {"gateway_2xx": ok_responses, "rows_status_200": rows_ok, "complete": rows_ok >= ok_responses},
    }
    g = summary.get("gateway", {})
    report["targets"] = {
        "added_p50_ms_1conn": {"value": g.get(1, {}).get("added_p50_ms"),
                               "target_max": TARGETS["p50_added_ms_1conn"]},
        "gateway_rps_32conn": {"value": g.get(32, {}).get("rps"), "target_min": TARGETS["gateway_rps_32conn"]},
    }
    report["ratios"] = peer_ratios(results, summary)
    out = Path(args.out) if args.out else VAR / (f"bench-results-{args.label}.json" if args.label
                                                 else "bench-results.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, summary)
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0 if report["ledger"]["complete"] else 1


def print_table(report: dict, summary: dict[str, dict]) -> None:
    cfg = report["config"]
    server = cfg.get("server", "uvicorn")
    print(f"\n{report['label']}: {cfg['workers']} {server} workers ({cfg['loop']}/{cfg['http']}), "
          f"{cfg['database']}, {cfg['duration_s']:g} s per run, {cfg['rounds']} round(s), nice {cfg['nice']}, "
          f"env {cfg['gateway_env'] or '{}'}")
    for name, info in report["peers"].items():
        print(f"  {name}: {info['describe']}")
    print(f"{'target':<8} {'round':>5} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'errors':>6} {'added p50':>9} {'cpu ms/req':>10} {'load':>5}")
    runs = [(name, r) for name, rs in (("direct", report["direct"]), ("gateway", report["gateway"]),
                                       *((n, p["runs"]) for n, p in report["peers"].items())) for r in rs]
    for name, r in sorted(runs, key=lambda nr: (nr[1]["round"], nr[1]["connections"])):
        added = f"{r['added_p50_ms']:.3f}" if "added_p50_ms" in r else ""
        print(f"{name:<8} {r['round']:>5} {r['connections']:>5} {r['rps']:>9.1f} {r['p50_ms']:>8.3f} "
              f"{r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['errors']:>6} {added:>9} "
              f"{r['server_cpu_ms_per_req'] or 0:>10.3f} {r['loadavg_1m_before']:>5.2f}")
    if cfg["rounds"] > 1 or report["peers"]:
        print(f"\nmedian of {cfg['rounds']} round(s)")
        print(f"{'system':<8} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>9} "
              f"{'cpu ms/req':>10} {'errors':>6}")
        for name, by_c in summary.items():
            for c, s in by_c.items():
                def f(v, fmt):
                    return format(v, fmt) if v is not None else "-"
                print(f"{name:<8} {c:>5} {f(s['rps'], '.1f'):>9} {f(s['p50_ms'], '.3f'):>8} "
                      f"{f(s['p99_ms'], '.3f'):>8} {f(s['added_p50_ms'], '.3f'):>9} "
                      f"{f(s['server_cpu_ms_per_req'], '.3f'):>10} {s['errors']:>6}")
    labels = {"rps_gateway_over_portkey_32conn": "gateway req/s ÷ Portkey req/s at 32 connections",
              "rps_gateway_over_litellm_32conn": "gateway req/s ÷ LiteLLM req/s at 32 connections",
              "added_p50_gateway_over_portkey_1conn": "gateway added p50 ÷ Portkey added p50 at 1 connection"}
    if report["ratios"]:
        print()
    for k, v in report["ratios"].items():
        rounds = ", ".join("-" if x is None else f"{x:.2f}" for x in v["per_round"])
        if v["value"] is None:
            print(f"{labels[k]}: - (not measured)")
            continue
        if "target_min" in v:
            goal, met = f">= {v['target_min']:g}", v["value"] >= v["target_min"]
        else:
            goal, met = f"<= {v['target_max']:g}", v["value"] <= v["target_max"]
        print(f"{labels[k]}: {v['value']:.2f} (target {goal}) {'OK' if met else 'MISSED'}; per round: {rounds}")
    t = report["targets"]
    a, rps = t["added_p50_ms_1conn"]["value"], t["gateway_rps_32conn"]["value"]
    if a is not None:
        print(f"added p50 at 1 connection: {a:.3f} ms (target <= {t['added_p50_ms_1conn']['target_max']} ms)"
              f" {'OK' if a <= t['added_p50_ms_1conn']['target_max'] else 'MISSED'}")
    if rps is not None:
        print(f"gateway at 32 connections: {rps:.0f} req/s (target >= {t['gateway_rps_32conn']['target_min']})"
              f" {'OK' if rps >= t['gateway_rps_32conn']['target_min'] else 'MISSED'}")
    idle = {}
    for _name, r in runs:
        for other, sec in r.get("idle_servers_cpu_s", {}).items():
            idle[other] = max(idle.get(other, 0.0), sec)
    if idle:
        print("most CPU an idle system used during another's run: "
              + ", ".join(f"{n} {s:.2f} s" for n, s in idle.items()))
    settles = [r["settle_s"] for _name, r in runs if "settle_s" in r]
    if settles:
        print(f"wait for the servers to go idle after a turn: up to {max(settles):.2f} s")
    led = report["ledger"]
    print(f"ledger: {led['rows_status_200']} rows with status 200 for {led['gateway_2xx']} 2xx responses"
          f" ({'complete' if led['complete'] else 'MISSING ROWS'}); load average after {report['machine']}")


if __name__ == "__main__":
    sys.exit(main())
