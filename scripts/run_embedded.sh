#!/usr/bin/env bash
# The embedded default: web (uvicorn) and a Celery worker on the filesystem broker, no services.
set -euo pipefail
HOST=${1:-127.0.0.1}
PORT=${2:-8000}
BIN=.venv/bin
KEY=$(cat var/demo_key)
# The demo may run on the published demo SECRET_KEY (ignored when SECRET_KEY is set).
export LLMS_DEMO=${LLMS_DEMO:-1}
# Web and worker count into one folder, so /metrics adds them up (prometheus_client multiprocess mode);
# emptied at each start.
export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-var/prometheus}
mkdir -p "$PROMETHEUS_MULTIPROC_DIR" && rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db

# Every queue is declared in the settings: the worker consumes them all without -Q.
$BIN/celery -A config worker --pool threads --concurrency 4 --loglevel WARNING \
  -B -s var/celerybeat-schedule > var/worker.log 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true' EXIT INT TERM

cat <<TXT

  LLM Service (embedded demo) is starting.

  Base URL (OpenAI SDK base_url):  http://$HOST:$PORT/v1
  Demo API key:                     $KEY
  Admin:                            http://$HOST:$PORT/admin/      (admin / admin)
  Dashboard:                        http://$HOST:$PORT/dashboard/  (manager / manager)

  Try it:
    curl http://$HOST:$PORT/v1/chat/completions -H "Authorization: Bearer $KEY" \\
      -H 'content-type: application/json' \\
      -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}'

  Worker log: var/worker.log.  Stop with Ctrl-C.

TXT
$BIN/uvicorn config.asgi:application --host "$HOST" --port "$PORT" --log-level warning
