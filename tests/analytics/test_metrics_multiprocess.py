"""Web and worker processes add up on /metrics (prometheus_client's multiprocess mode): a batch line
run by a Celery worker is counted like a request the web process served."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

OBSERVE = """
from apps.analytics.metrics import attempts_observe
attempts_observe([("up", "1:m", "error", 0.2), ("mock", "2:m", "ok", 0.1)])
"""
SCRAPE = """
import sys
from apps.analytics.metrics import metrics_text
sys.stdout.write(metrics_text()[0].decode())
"""


def _run(code: str, folder: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True,
                          text=True, timeout=60).stdout


def test_attempts_counted_in_two_processes_add_up_on_metrics(tmp_path):
    _run(OBSERVE, tmp_path)  # e.g. the web process
    _run(OBSERVE, tmp_path)  # e.g. a Celery worker running batch lines

    text = _run(SCRAPE, tmp_path)  # /metrics, in yet another process

    assert 'llm_upstream_attempts_total{deployment="1:m",outcome="error",provider="up"} 2.0' in text
    assert 'llm_upstream_attempts_total{deployment="2:m",outcome="ok",provider="mock"} 2.0' in text
    assert 'llm_upstream_attempt_duration_seconds_count{deployment="1:m",provider="up"} 2.0' in text
