"""Run bench/run.py for each variant of the hot path and print one table (var/bench-variants.json).

    .venv/bin/python bench/variants.py                 # every variant, 10 s per measurement
    .venv/bin/python bench/variants.py --only transport-httpx,ledger-orm --duration 5

Each variant is one gateway configuration (environment or uvicorn flags); the default one also
measures the upstream directly. Variants run one after another on the same machine: compare them
within one run, and mind the load average column (other work on the machine skews everything).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "transport-aiohttp": ["--gateway-env", "GATEWAY_HTTP_TRANSPORT=aiohttp"],
    "transport-httpx-aiohttp": ["--gateway-env", "GATEWAY_HTTP_TRANSPORT=httpx-aiohttp"],
    "transport-httpx": ["--gateway-env", "GATEWAY_HTTP_TRANSPORT=httpx"],
    "ledger-single": ["--gateway-env", "GATEWAY_LEDGER_WRITER=single"],
    "ledger-orm": ["--gateway-env", "GATEWAY_LEDGER_WRITER=orm"],
    "ledger-redis-stream": ["--gateway-env", "GATEWAY_LEDGER_WRITER=redis-stream"],
    "django-handler": ["--gateway-env", "GATEWAY_LEAN_DATA_PLANE=false"],
    "uvicorn-asyncio-h11": ["--loop", "asyncio", "--http", "h11"],
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", help="comma-separated variant names (default: all)")
    p.add_argument("--duration", default="10")
    p.add_argument("--connections", default="1,32")
    p.add_argument("--nice", default="0", help="passed to run.py")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows = []
    for name in names:
        argv = [sys.executable, str(ROOT / "bench" / "run.py"), "--label", name, "--duration", args.duration,
                "--connections", args.connections, "--nice", args.nice, *VARIANTS[name]]
        if name != "default":
            argv.append("--skip-direct")
        print(f"[variants] {name}", file=sys.stderr, flush=True)
        subprocess.run(argv, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        result = json.loads((VAR / f"bench-results-{name}.json").read_text())
        for g in result["gateway"]:
            rows.append({"variant": name, **g, "ledger_complete": result["ledger"]["complete"]})
    (VAR / "bench-variants.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'variant':<24} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/req':>10} {'load':>5}"
          " ledger")
    for r in rows:
        print(f"{r['variant']:<24} {r['connections']:>5} {r['rps']:>8.1f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{r['server_cpu_ms_per_req'] or 0:>10.3f} {r['loadavg_1m_before']:>5.2f} "
              f"{'ok' if r['ledger_complete'] else 'MISSING'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
