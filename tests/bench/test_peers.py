"""The bench's peer plumbing (bench/peers.py, bench/run.py): installs are skipped at the pinned
version, each peer is routed to the bench upstream, and the ratios come from the same rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
import run  # noqa: E402

UPSTREAM = "http://127.0.0.1:9100/v1"


@pytest.fixture
def peers_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path)
    return tmp_path


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"nothing should be run: {args}")


def test_portkey_install_is_skipped_at_the_pinned_version(peers_dir, monkeypatch):
    pkg = peers.portkey_package_json()
    pkg.parent.mkdir(parents=True)
    pkg.write_text(json.dumps({"name": "@portkey-ai/gateway", "version": peers.PORTKEY_VERSION}))
    monkeypatch.setattr(subprocess, "run", no_subprocess)

    peers.install_portkey()


def test_portkey_install_runs_npm_at_the_pin_when_another_version_is_there(peers_dir, monkeypatch):
    pkg = peers.portkey_package_json()
    pkg.parent.mkdir(parents=True)
    pkg.write_text(json.dumps({"version": "1.9.8"}))
    calls = []

    def fake_npm(argv, **kwargs):
        calls.append(argv)
        pkg.write_text(json.dumps({"version": peers.PORTKEY_VERSION}))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(peers.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(subprocess, "run", fake_npm)

    peers.install_portkey()

    assert calls == [["/usr/bin/npm", "install", "--prefix", str(peers_dir / "portkey"), "--no-audit", "--no-fund",
                      "--save-exact", f"@portkey-ai/gateway@{peers.PORTKEY_VERSION}"]]


def test_litellm_install_is_skipped_at_the_pinned_version(peers_dir, monkeypatch):
    bindir = peers_dir / "litellm-venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python").touch()
    (bindir / "litellm").touch()

    def version_probe(argv, **kwargs):
        assert argv[0] == str(bindir / "python") and "importlib.metadata" in argv[2], argv
        return subprocess.CompletedProcess(argv, 0, stdout=f"{peers.LITELLM_VERSION}\n")

    monkeypatch.setattr(subprocess, "run", version_probe)

    peers.install_litellm()


def test_litellm_routes_the_model_to_the_upstream_without_the_bench_database(peers_dir, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/llm_bench")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/11")

    peer = peers.litellm_peer(4100, UPSTREAM, workers=2)

    config = (peers_dir / "litellm-config.yaml").read_text()
    assert f"model_name: {peers.MODEL}" in config and f"api_base: {UPSTREAM}" in config
    assert peer.argv[1:] == ["--config", str(peers_dir / "litellm-config.yaml"), "--host", "127.0.0.1",
                             "--port", "4100", "--num_workers", "2", "--telemetry", "False"]
    assert "DATABASE_URL" not in peer.env and "REDIS_URL" not in peer.env
    assert peer.chat_url == "http://127.0.0.1:4100/v1/chat/completions"


def test_portkey_is_headless_on_its_port_and_routed_by_headers(peers_dir, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/llm_bench")

    peer = peers.portkey_peer(4200, UPSTREAM)

    assert peer.argv[-2:] == ["--port=4200", "--headless"]
    assert peer.argv[1].endswith("@portkey-ai/gateway/build/start-server.js")
    assert peer.headers["x-portkey-provider"] == "openai"
    assert peer.headers["x-portkey-custom-host"] == UPSTREAM
    assert peer.headers["authorization"] == f"Bearer {peers.UPSTREAM_KEY}"
    assert "DATABASE_URL" not in peer.env


def turn(rnd: int, c: int, rps: float, p50: float, added: float | None = None) -> dict:
    r = {"round": rnd, "connections": c, "rps": rps, "p50_ms": p50, "p99_ms": p50 * 3, "errors": 0,
         "server_cpu_ms_per_req": 1.0}
    if added is not None:
        r["added_p50_ms"] = added
    return r


def test_ratios_come_from_the_medians_and_pair_the_same_rounds():
    systems = {
        "gateway": [turn(1, 1, 400, 2.1, 2.0), turn(1, 32, 900, 30), turn(2, 1, 500, 1.6, 1.5),
                    turn(2, 32, 1200, 25), turn(3, 1, 450, 1.9, 1.8), turn(3, 32, 600, 40)],
        "portkey": [turn(1, 1, 700, 1.1, 1.0), turn(1, 32, 900, 20), turn(2, 1, 700, 1.1, 1.0),
                    turn(2, 32, 1000, 20), turn(3, 1, 700, 1.3, 1.2), turn(3, 32, 600, 30)],
        "litellm": [turn(1, 32, 300, 90), turn(2, 32, 200, 100), turn(3, 32, 150, 110)],
    }
    summary = {name: run.summarise(runs) for name, runs in systems.items()}

    ratios = run.peer_ratios(systems, summary)

    # Medians: gateway 900 req/s and 1.8 ms added; Portkey 900 req/s and 1.0 ms; LiteLLM 200 req/s.
    assert ratios["rps_gateway_over_portkey_32conn"]["value"] == 1.0
    assert ratios["rps_gateway_over_portkey_32conn"]["per_round"] == [1.0, 1.2, 1.0]
    assert ratios["rps_gateway_over_litellm_32conn"]["value"] == 4.5
    assert ratios["rps_gateway_over_litellm_32conn"]["per_round"] == [3.0, 6.0, 4.0]
    assert ratios["added_p50_gateway_over_portkey_1conn"]["value"] == 1.8
    assert ratios["added_p50_gateway_over_portkey_1conn"]["per_round"] == [2.0, 1.5, 1.5]
    assert ratios["added_p50_gateway_over_portkey_1conn"]["target_max"] == 1.5


def test_without_a_peer_or_a_figure_there_is_no_ratio():
    systems = {"gateway": [turn(1, 32, 900, 30)], "portkey": [turn(1, 32, 900, 20)]}
    summary = {name: run.summarise(runs) for name, runs in systems.items()}

    ratios = run.peer_ratios(systems, summary)

    assert "rps_gateway_over_litellm_32conn" not in ratios
    assert ratios["added_p50_gateway_over_portkey_1conn"]["value"] is None  # no 1-connection turn
