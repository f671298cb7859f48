"""Per-request CPU cost of the gateway's ASGI app, in process (no server, no load generator):
drives `config.asgi.application` directly with N concurrent in-flight requests against the fast fake
upstream, and prints the CPU time per request, optionally with a cProfile of the hot path.

Needs the bench's database state (run `make bench` once first) and a key:
    .venv/bin/python bench/inproc.py --key sk-... --upstream-port 9311 [--profile] [-n 3000] [-c 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def drive(app, key: str, n: int, concurrency: int) -> list[float]:
    body = b'{"model":"bench-model","messages":[{"role":"user","content":"hello from the benchmark"}],"max_tokens":64}'
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode())]

    async def one():
        sent = False
        done = asyncio.Event()
        status = []

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            elif msg["type"] == "http.response.body" and not msg.get("more_body"):
                done.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 8000)}
        await app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"status {status}")

    sem = asyncio.Semaphore(concurrency)

    latencies: list[float] = []

    async def bounded():
        async with sem:
            t = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(bounded() for _ in range(n)))
    return sorted(latencies)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--key", required=True)
    p.add_argument("-n", type=int, default=3000)
    p.add_argument("-c", type=int, default=32)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import uvloop

    from config.asgi import application

    async def run():
        await drive(application, args.key, 300, args.c)  # warm up
        import resource

        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            lat = await drive(application, args.key, args.n, args.c)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(35)
            prof.dump_stats(os.environ.get("PROF_OUT", "var/inproc.prof"))
        else:
            lat = await drive(application, args.key, args.n, args.c)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        user, system = (r1.ru_utime - r0.ru_utime) * 1000 / args.n, (r1.ru_stime - r0.ru_stime) * 1000 / args.n
        print(f"user {user:.3f} ms, sys {system:.3f} ms per request; "
              f"{r1.ru_nivcsw - r0.ru_nivcsw} involuntary context switches")
        print(f"{args.n} requests, {args.c} in flight: {args.n / wall:.0f} req/s wall, "
              f"{cpu * 1000 / args.n:.3f} ms CPU per request (this process), "
              f"p50 {lat[len(lat) // 2] * 1000:.3f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.3f} ms, "
              f"load {os.getloadavg()[0]:.2f}")

    uvloop.run(run())


if __name__ == "__main__":
    main()
