"""Every environment variable the README's configuration table documents is read by the settings,
and every one the settings read is documented there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Read by config/settings.py but deliberately not in the table, with the reason.
UNDOCUMENTED_OK = {
    "CELERY_TASK_ALWAYS_EAGER": "a test switch (tasks run in the caller), not an operator setting",
    "CELERY_FS_POLLING_INTERVAL_S": "the embedded filesystem broker's poll period, tuned by the tests",
    "CELERY_VISIBILITY_TIMEOUT_S": "Redis broker redelivery; the resume sweep (GATEWAY_JOB_LEASE_S) acts first",
    "OTEL_SDK_DISABLED": "a standard OpenTelemetry switch, named in the OTEL_EXPORTER_OTLP_* row's text",
    "OTEL_TRACES_EXPORTER": "a standard OpenTelemetry switch, named in the OTEL_EXPORTER_OTLP_* row's text",
}
# Documented in the table but read by something else than config/settings.py, with the reason.
READ_ELSEWHERE = {
    "FORWARDED_ALLOW_IPS": "read by uvicorn and gunicorn, not by Django",
    "PROMETHEUS_MULTIPROC_DIR": "read by prometheus_client in every process (apps/analytics/metrics.py)",
}


def settings_env_names() -> set[str]:
    text = (ROOT / "config" / "settings.py").read_text()
    return set(re.findall(r"""\benv(?:\.\w+)?\(\s*["']([A-Z][A-Z0-9_]*)["']""", text))


def readme_table_names() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n### ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    return names


def test_readme_configuration_table_is_parsed():
    names = readme_table_names()
    assert {"DATABASE_URL", "SECRET_KEY", "GATEWAY_UPSTREAM_READ_TIMEOUT_S"} <= names


def test_every_documented_variable_is_read_by_the_settings():
    missing = readme_table_names() - settings_env_names() - set(READ_ELSEWHERE)
    assert not missing, f"documented in README but not read in config/settings.py: {sorted(missing)}"


def test_every_variable_the_settings_read_is_documented():
    undocumented = settings_env_names() - readme_table_names() - set(UNDOCUMENTED_OK)
    assert not undocumented, f"read in config/settings.py but not in README's table: {sorted(undocumented)}"


def test_exemptions_are_still_needed():
    assert not set(UNDOCUMENTED_OK) & readme_table_names()
    assert set(UNDOCUMENTED_OK) <= settings_env_names()
    assert not set(READ_ELSEWHERE) & settings_env_names()
