"""The peers `make bench PEERS=portkey,litellm` measures the gateway against, at pinned versions.

Each peer is installed under var/peers/ (skipped when the pinned version is already there), started
as a child of bench/run.py's Processes helper on its own port, and routed to the same fake upstream
as the gateway. `Peer.headers` are the extra request headers wrk sends to it; the request body is
the same for every system.

- LiteLLM proxy, from the Python package index (`litellm[proxy]`), in its own virtual environment
  var/peers/litellm-venv, without a database: a config.yaml with one model routed to the upstream,
  no master key, `--num_workers 2`.
- Portkey's open-source gateway, from the npm registry (`@portkey-ai/gateway`), in
  var/peers/portkey, one Node process, `--port=N --headless`; routed per request with Portkey's
  headers (`x-portkey-provider: openai`, `x-portkey-custom-host`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "var" / "peers"

LITELLM_VERSION = "1.80.0"
PORTKEY_VERSION = "1.15.2"
# The model name every system is asked for (the gateway's alias, LiteLLM's model_name); the
# upstream answers the same whatever the model.
MODEL = "bench-model"
UPSTREAM_MODEL = "bench-up"
UPSTREAM_KEY = "sk-bench-upstream"

# Peers get a clean environment: LiteLLM reads DATABASE_URL (it would try to use the gateway's
# PostgreSQL through Prisma) and REDIS_* from the environment, so only these pass through.
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def clean_env(**extra: str) -> dict:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update(extra)
    return env


@dataclass
class Peer:
    name: str
    version: str
    argv: list[str]
    env: dict
    health_url: str
    chat_url: str
    headers: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 180.0
    describe: str = ""


# --- LiteLLM -----------------------------------------------------------------------------------

def litellm_venv() -> Path:
    return PEERS_DIR / "litellm-venv"


def installed_python_package_version(python: Path, package: str) -> str | None:
    if not python.exists():
        return None
    proc = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def install_litellm(version: str = LITELLM_VERSION) -> None:
    venv = litellm_venv()
    python = venv / "bin" / "python"
    have = installed_python_package_version(python, "litellm")
    if have == version and (venv / "bin" / "litellm").exists():
        log(f"litellm {version} already installed in {rel(venv)}")
        return
    log(f"installing litellm[proxy]=={version} into {rel(venv)} (was {have or 'absent'})")
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        # The base interpreter of the bench's own venv (the venv module follows sys._base_executable).
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    logfile = PEERS_DIR / "litellm-install.log"
    with open(logfile, "wb") as out:
        proc = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                               f"litellm[proxy]=={version}"], stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or installed_python_package_version(python, "litellm") != version:
        raise SystemExit(f"installing litellm {version} failed: see {logfile}")


def litellm_peer(port: int, upstream_base: str, workers: int, version: str = LITELLM_VERSION) -> Peer:
    venv = litellm_venv()
    config = PEERS_DIR / "litellm-config.yaml"
    config.write_text(
        "# Written by bench/run.py: one model routed to the bench's fake upstream, no database.\n"
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{UPSTREAM_MODEL}\n"
        f"      api_base: {upstream_base}\n"
        f"      api_key: {UPSTREAM_KEY}\n"
    )
    argv = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", str(workers), "--telemetry", "False"]
    base = f"http://127.0.0.1:{port}"
    return Peer(
        name="litellm", version=version, argv=argv,
        env=clean_env(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
                      PYTHONDONTWRITEBYTECODE="1"),
        health_url=f"{base}/health/liveliness", chat_url=f"{base}/v1/chat/completions",
        # No master key: LiteLLM does not check it; sent anyway so every system gets the same headers.
        headers={"authorization": "Bearer sk-bench-litellm"},
        describe=f"LiteLLM proxy {version}, {workers} uvicorn workers, no database, no master key",
    )


# --- Portkey -----------------------------------------------------------------------------------

def portkey_dir() -> Path:
    return PEERS_DIR / "portkey"


def portkey_package_json() -> Path:
    return portkey_dir() / "node_modules" / "@portkey-ai" / "gateway" / "package.json"


def installed_portkey_version() -> str | None:
    try:
        return json.loads(portkey_package_json().read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def install_portkey(version: str = PORTKEY_VERSION) -> None:
    have = installed_portkey_version()
    if have == version:
        log(f"@portkey-ai/gateway {version} already installed in {rel(portkey_dir())}")
        return
    npm = shutil.which("npm")
    node = shutil.which("node")
    if not npm or not node:
        raise SystemExit("Portkey's gateway needs Node.js and npm (e.g. Debian packages nodejs and npm)")
    log(f"installing @portkey-ai/gateway@{version} into {rel(portkey_dir())} (was {have or 'absent'})")
    portkey_dir().mkdir(parents=True, exist_ok=True)
    logfile = PEERS_DIR / "portkey-install.log"
    with open(logfile, "wb") as out:
        proc = subprocess.run([npm, "install", "--prefix", str(portkey_dir()), "--no-audit", "--no-fund",
                               "--save-exact", f"@portkey-ai/gateway@{version}"],
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or installed_portkey_version() != version:
        raise SystemExit(f"installing @portkey-ai/gateway {version} failed: see {logfile}")


def portkey_peer(port: int, upstream_base: str, version: str = PORTKEY_VERSION) -> Peer:
    # The package's bin (what `npx @portkey-ai/gateway` runs), started directly with node: npm 11's
    # npx takes `--port=N --headless` as its own options and starts the gateway on 8787 without them.
    script = portkey_dir() / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    argv = [shutil.which("node") or "node", str(script), f"--port={port}", "--headless"]
    base = f"http://127.0.0.1:{port}"
    return Peer(
        name="portkey", version=version, argv=argv,
        # No REDIS_CONNECTION_STRING: Portkey keeps its caches in memory.
        env=clean_env(NODE_ENV="production"),
        health_url=f"{base}/", chat_url=f"{base}/v1/chat/completions",
        headers={"authorization": f"Bearer {UPSTREAM_KEY}", "x-portkey-provider": "openai",
                 "x-portkey-custom-host": upstream_base},
        startup_timeout=60.0,
        describe=f"Portkey gateway {version} (Node {node_version()}, one process), headless, provider openai "
                 "with a custom host",
    )


def node_version() -> str:
    node = shutil.which("node")
    if not node:
        return "?"
    return subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()


KNOWN = ("portkey", "litellm")


def install(names: list[str]) -> None:
    for name in names:
        {"portkey": install_portkey, "litellm": install_litellm}[name]()


def build(name: str, port: int, upstream_base: str, *, litellm_workers: int) -> Peer:
    if name == "portkey":
        return portkey_peer(port, upstream_base)
    if name == "litellm":
        return litellm_peer(port, upstream_base, litellm_workers)
    raise ValueError(name)
