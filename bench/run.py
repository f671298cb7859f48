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
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

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


def django_setup(env: dict, upstream_base: str, features: str = "all") -> str:
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
    from apps.billing.models import Budget
    from apps.gateway.models import RateLimit

    # gateway_apply adds and updates but never deletes: start from no limits and budgets.
    Budget.objects.filter(tenant__slug=TENANT).delete()
    RateLimit.objects.filter(tenant__slug=TENANT).delete()
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


def ledger_drain_stream() -> None:
    """With GATEWAY_LEDGER_WRITER=redis-stream, move the stream's rows to the ledger (the Celery
    task's job in production) so the ledger check can count them."""
    from django.conf import settings

    if getattr(settings, "GATEWAY_LEDGER_WRITER", "") == "redis-stream":
        from apps.analytics.services import ledger_stream_drain

        while ledger_stream_drain():
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


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in a process group (uvicorn and its workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def run_wrk(wrk: str, url: str, *, connections: int, duration: float, key: str = "", pgid: int | None = None) -> dict:
    cpu_before = group_cpu_seconds(pgid) if pgid else 0.0
    load_before = os.getloadavg()[0]
    threads = 1 if connections < 8 else 2
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(BENCH / "post.lua"), url]
    env = {**os.environ, "BENCH_KEY": key}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 30, check=False,
                          preexec_fn=_niceness(NICE))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    r = json.loads(line.removeprefix("BENCH_JSON "))
    cpu = group_cpu_seconds(pgid) - cpu_before if pgid else 0.0
    errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"] + r["non_2xx"]
    return {
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per target (default 3)")
    p.add_argument("--connections", default="1,32", help="comma-separated connection counts (default 1,32)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    p.add_argument("--loop", default="uvloop", help="uvicorn --loop (default uvloop)")
    p.add_argument("--http", default="httptools", help="uvicorn --http (default httptools)")
    p.add_argument("--upstream", choices=["fast", "aiohttp"], default="fast",
                   help="fast: bench/upstream.py (default); aiohttp: tests/fakes/openai_server.py")
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the gateway (repeatable), e.g. GATEWAY_HTTP_TRANSPORT=httpx")
    p.add_argument("--skip-direct", action="store_true", help="measure only through the gateway")
    p.add_argument("--features", choices=["all", "none"], default="all",
                   help="all (default): rate limits on key, source and tenant plus a hard budget, so admission "
                        "runs; none: no limits or budgets")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the processes the bench starts (e.g. -10 when other work shares the machine)")
    p.add_argument("--label", default="", help="name of this variant; results go to var/bench-results-LABEL.json")
    p.add_argument("--out", help="results file (default var/bench-results.json, or -LABEL.json)")
    args = p.parse_args()

    global NICE
    NICE = args.nice
    VAR.mkdir(exist_ok=True)
    conns = [int(c) for c in args.connections.split(",") if c.strip()]
    wrk = ensure_wrk()
    base_env = {k: os.environ.get(k) or v for k, v in DEFAULT_ENV.items()}
    ensure_database(base_env["DATABASE_URL"])
    extra = parse_kv(args.gateway_env)
    up_port, gw_port = free_port(), free_port()
    upstream_base = f"http://127.0.0.1:{up_port}/v1"
    child_env = {**os.environ, **base_env, UPSTREAM_SECRET_ENV: "sk-bench-upstream", "DEBUG": "false",
                 "LOG_LEVEL": "WARNING", "PYTHONDONTWRITEBYTECODE": "1", **extra}
    key = django_setup(child_env, upstream_base, args.features)

    procs = Processes(nice=args.nice)
    signal.signal(signal.SIGTERM, _interrupt)
    results: dict = {"direct": [], "gateway": []}
    try:
        up_argv = ([PYTHON, str(BENCH / "upstream.py"), "--port", str(up_port)] if args.upstream == "fast"
                   else [PYTHON, "-m", "tests.fakes.openai_server", "--port", str(up_port)])
        up = procs.start("upstream", up_argv, child_env, VAR / "bench-upstream.log")
        wait_for(lambda: socket.create_connection(("127.0.0.1", up_port), 1).close() is None, "upstream")

        gw_argv = [str(Path(PYTHON).parent / "uvicorn"), "config.asgi:application", "--host", "127.0.0.1",
                   "--port", str(gw_port), "--workers", str(args.workers), "--loop", args.loop, "--http", args.http,
                   "--no-access-log", "--log-level", "warning", "--lifespan", "off"]
        gw_proc = procs.start("gateway", gw_argv, child_env, VAR / "bench-gateway.log")
        gw = f"http://127.0.0.1:{gw_port}"
        wait_for(lambda: http_ok(f"{gw}/healthz"), "gateway", timeout=60)
        chat = f"{gw}/v1/chat/completions"
        direct = f"{upstream_base}/chat/completions"

        # One request first: a wrong setup should fail loudly, not as a table of errors.
        req = urllib.request.Request(chat, method="POST", headers={
            "authorization": f"Bearer {key}", "content-type": "application/json"},
            data=json.dumps({"model": ALIAS, "messages": [{"role": "user", "content": "hi"}]}).encode())
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
            assert body["choices"][0]["message"]["content"], body

        if args.warmup > 0:
            log(f"warm-up {args.warmup:g} s")
            if not args.skip_direct:
                run_wrk(wrk, direct, connections=32, duration=args.warmup)
            run_wrk(wrk, chat, connections=32, duration=args.warmup, key=key)
        ledger_drain_stream()
        ledger_clear()

        for c in conns:
            if not args.skip_direct:
                log(f"direct  c={c:<3} {args.duration:g} s")
                results["direct"].append(run_wrk(wrk, direct, connections=c, duration=args.duration,
                                                 pgid=up.pid))
            log(f"gateway c={c:<3} {args.duration:g} s")
            results["gateway"].append(run_wrk(wrk, chat, connections=c, duration=args.duration, key=key,
                                              pgid=gw_proc.pid))
    finally:
        procs.stop_all()

    # Ledger check: every 2xx the load generator saw has its row (the gateway may have written rows
    # for a few more requests that wrk cut off at the end of a run).
    ledger_drain_stream()
    ok_responses = sum(r["ok"] for r in results["gateway"])
    rows_ok = ledger_count(status=200)
    report = {
        "label": args.label or "default",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "config": {"duration_s": args.duration, "nice": args.nice, "workers": args.workers, "loop": args.loop,
                   "http": args.http,
                   "upstream": args.upstream, "features": args.features, "gateway_env": extra,
                   "database": base_env["DATABASE_URL"].split("://")[0]},
        "direct": results["direct"],
        "gateway": results["gateway"],
        "ledger": {"gateway_2xx": ok_responses, "rows_status_200": rows_ok, "complete": rows_ok >= ok_responses},
    }
    by_c = {r["connections"]: r for r in results["direct"]}
    for g in results["gateway"]:
        d = by_c.get(g["connections"])
        if d:
            g["added_p50_ms"] = round(g["p50_ms"] - d["p50_ms"], 3)
    g1 = next((g for g in results["gateway"] if g["connections"] == 1), None)
    g32 = next((g for g in results["gateway"] if g["connections"] == 32), None)
    report["targets"] = {
        "added_p50_ms_1conn": {"value": g1.get("added_p50_ms") if g1 else None,
                               "target_max": TARGETS["p50_added_ms_1conn"]},
        "gateway_rps_32conn": {"value": g32["rps"] if g32 else None, "target_min": TARGETS["gateway_rps_32conn"]},
    }
    out = Path(args.out) if args.out else VAR / (f"bench-results-{args.label}.json" if args.label
                                                 else "bench-results.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0 if report["ledger"]["complete"] else 1


def print_table(report: dict) -> None:
    cfg = report["config"]
    print(f"\n{report['label']}: {cfg['workers']} uvicorn workers ({cfg['loop']}/{cfg['http']}), "
          f"{cfg['database']}, {cfg['duration_s']:g} s per run, nice {cfg['nice']}, env {cfg['gateway_env'] or '{}'}")
    print(f"{'target':<8} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'errors':>6} {'added p50':>9} {'cpu ms/req':>10} {'load':>5}")
    for kind in ("direct", "gateway"):
        for r in report[kind]:
            added = f"{r['added_p50_ms']:.3f}" if "added_p50_ms" in r else ""
            print(f"{kind:<8} {r['connections']:>5} {r['rps']:>9.1f} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} "
                  f"{r['p99_ms']:>8.3f} {r['errors']:>6} {added:>9} {r['server_cpu_ms_per_req'] or 0:>10.3f}"
                  f" {r['loadavg_1m_before']:>5.2f}")
    t = report["targets"]
    a, rps = t["added_p50_ms_1conn"]["value"], t["gateway_rps_32conn"]["value"]
    if a is not None:
        print(f"added p50 at 1 connection: {a:.3f} ms (target <= {t['added_p50_ms_1conn']['target_max']} ms)"
              f" {'OK' if a <= t['added_p50_ms_1conn']['target_max'] else 'MISSED'}")
    if rps is not None:
        print(f"gateway at 32 connections: {rps:.0f} req/s (target >= {t['gateway_rps_32conn']['target_min']})"
              f" {'OK' if rps >= t['gateway_rps_32conn']['target_min'] else 'MISSED'}")
    led = report["ledger"]
    print(f"ledger: {led['rows_status_200']} rows with status 200 for {led['gateway_2xx']} 2xx responses"
          f" ({'complete' if led['complete'] else 'MISSING ROWS'}); load average after {report['machine']}")


if __name__ == "__main__":
    sys.exit(main())
