"""Settings. Everything is read from the environment here and nowhere else.

With nothing but LLMS_DEMO=1 (which `make run` sets) the service runs in its embedded default: a
SQLite file, in-process cache and counters, and Celery on a filesystem broker under var/. Without
LLMS_DEMO (or DEBUG) it refuses to start until SECRET_KEY is set. Setting DATABASE_URL, REDIS_URL
and CELERY_BROKER_URL switches to PostgreSQL, Redis and Celery on Redis.
"""

import base64
import hashlib
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from apps.core import redis_url
from apps.core.redis_url import CLUSTER_SCHEMES, SENTINEL_SCHEMES

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DEBUG", default=False)
# "production" turns on every transport protection below (HSTS, HTTPS redirect, secure cookies, the
# proxy's X-Forwarded-Proto) and never accepts the demo SECRET_KEY; each stays switchable on its own.
DJANGO_PROFILE = env("DJANGO_PROFILE", default="embedded")
if DJANGO_PROFILE not in ("embedded", "production"):
    raise ImproperlyConfigured(f"DJANGO_PROFILE={DJANGO_PROFILE!r}: must be 'embedded' or 'production'.")
PRODUCTION = DJANGO_PROFILE == "production"
# The embedded demo (`make run`, CI's smoke test, the test suite) asks for the published demo key
# explicitly; anything else must set SECRET_KEY (or run with DEBUG=true).
LLMS_DEMO = env.bool("LLMS_DEMO", default=False) and not PRODUCTION
DEMO_SECRET_KEY = "embedded-demo-secret-key-change-me-in-production-0123456789"
SECRET_KEY = env("SECRET_KEY", default="")
if not SECRET_KEY:
    if not ((DEBUG and not PRODUCTION) or LLMS_DEMO):
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY (and API_KEY_HMAC_SECRET, FERNET_KEYS) in the environment; "
            "the published demo key is used only with DEBUG=true or LLMS_DEMO=1 (the embedded demo, `make run`).")
    SECRET_KEY = DEMO_SECRET_KEY
# Loopback names only by default: production lists its public host names (a Host header naming any
# other host gets 400, so links in mails, e.g. password resets, never point elsewhere).
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# --- transport (behind a TLS-terminating proxy in production; see README "Running in production") --
# The proxy must set (overwrite) this header: "HTTP_X_FORWARDED_PROTO,https" trusts X-Forwarded-Proto.
_proxy_ssl_header = env.list("SECURE_PROXY_SSL_HEADER",
                             default=["HTTP_X_FORWARDED_PROTO", "https"] if PRODUCTION else [])
if _proxy_ssl_header and len(_proxy_ssl_header) != 2:
    raise ImproperlyConfigured("SECURE_PROXY_SSL_HEADER must be 'HEADER,value', e.g. HTTP_X_FORWARDED_PROTO,https")
SECURE_PROXY_SSL_HEADER = tuple(_proxy_ssl_header) if _proxy_ssl_header else None
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=PRODUCTION)
# Load balancers probe these over plain HTTP (paths without the leading slash, as Django matches them).
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000 if PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=PRODUCTION)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=PRODUCTION)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=PRODUCTION)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=PRODUCTION)

# Secrets for API key digests and provider credential encryption. Derived from SECRET_KEY when not
# set, so the embedded default works; production sets both explicitly.
API_KEY_HMAC_SECRET = env("API_KEY_HMAC_SECRET", default=f"hmac:{SECRET_KEY}")
FERNET_KEYS = env.list(
    "FERNET_KEYS",
    default=[base64.urlsafe_b64encode(hashlib.sha256(f"fernet:{SECRET_KEY}".encode()).digest()).decode()],
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "ninja",  # its Swagger UI page (/v1/docs) then loads its scripts from /static/, not from a CDN
    "axes",
    "apps.keys",
    "apps.gateway",
    "apps.billing",
    "apps.analytics",
]

MIDDLEWARE = [
    "apps.gateway.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # /api/ only: a control character (NUL...) in the path, query or body is a 400 (apps/keys/restapi.py).
    "apps.keys.restapi.ApiInputMiddleware",
    "axes.middleware.AxesMiddleware",  # last: turns a locked-out login into the lockout answer
]

# The data plane (/v1) runs only these (config/asgi.py): it authenticates by API key, so it needs no
# sessions, CSRF, auth or messages. Only natively async middleware: Django's MiddlewareMixin ones
# run their hooks in a thread (two thread hops per request each).
GATEWAY_MIDDLEWARE = [
    "apps.gateway.middleware.RequestIdMiddleware",
]
# False sends /v1 through Django's standard handler and MIDDLEWARE too (for comparison: bench/).
GATEWAY_LEAN_DATA_PLANE = env.bool("GATEWAY_LEAN_DATA_PLANE", default=True)
# The model calls straight from ASGI (apps/gateway/asgi.py); False: through the lean handler above.
GATEWAY_DIRECT_ROUTES = env.bool("GATEWAY_DIRECT_ROUTES", default=True)

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------------
VAR_DIR.mkdir(exist_ok=True)
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DB_POOL_MIN", default=2),
        "max_size": env.int("DB_POOL_MAX", default=20),
        "timeout": env.float("DB_POOL_TIMEOUT", default=10.0),
    }
else:
    # Tests run live servers in threads: the test database must be a file they all can open.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
         # Writers take the lock when the transaction begins and wait for it (`timeout`): a deferred
         # transaction that reads, then writes, fails at once with "database is locked" when another
         # connection wrote meanwhile (the embedded worker's batch lanes finalizing together did).
         "transaction_mode": "IMMEDIATE"}
    )
IS_POSTGRES = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- cache and shared state -----------------------------------------------------------------
REDIS_URL = env("REDIS_URL", default="")
# How long a Redis call on the hot path may take before the configured policy applies.
REDIS_TIMEOUT_S = env.float("REDIS_TIMEOUT_S", default=1.0)
# After a Redis failure, calls fail fast this long (one timeout per outage, not one per request).
REDIS_RETRY_AFTER_S = env.float("REDIS_RETRY_AFTER_S", default=1.0)
if REDIS_URL.startswith(SENTINEL_SCHEMES):  # redis+sentinel://host:26379,host2:26379/service/db
    CACHES = {"default": redis_url.django_cache(REDIS_URL, REDIS_TIMEOUT_S)}
    DJANGO_REDIS_CONNECTION_FACTORY = "django_redis.pool.SentinelConnectionFactory"
elif REDIS_URL.startswith(CLUSTER_SCHEMES):  # redis+cluster://host:6379,host2:6379
    redis_url.cluster_url(REDIS_URL)  # a malformed URL fails here, at startup
    # Django's own cache framework is not used by the application (the response cache, the
    # counters and the cooldowns go through apps.core.redis, which speaks Cluster); django-redis has
    # no Cluster client, so it stays in process.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "llms"}}
elif REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {
                "SOCKET_CONNECT_TIMEOUT": REDIS_TIMEOUT_S,
                "SOCKET_TIMEOUT": REDIS_TIMEOUT_S,
            },
            "KEY_PREFIX": "llms",
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "llms"}}

# --- Celery -----------------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
if redis_url.celery_broker_refused(CELERY_BROKER_URL):
    raise ImproperlyConfigured(redis_url.celery_broker_refused(CELERY_BROKER_URL))
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT = "config.kombu_filesystem:Transport"  # atomic message writes
    _queue_dir = VAR_DIR / "celery" / "queue"
    _queue_dir.mkdir(parents=True, exist_ok=True)
    (VAR_DIR / "celery" / "processed").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(VAR_DIR / "celery" / "processed"),
        "store_processed": False,
        "polling_interval": env.float("CELERY_FS_POLLING_INTERVAL_S", default=0.2),
    }
else:
    # Redis: a task a killed worker held comes back after visibility_timeout (the resume sweep below
    # usually gets there first); ten priority steps so metadata.priority 0..9 each has its own list.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT_S", default=3600),
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
    }
    if CELERY_BROKER_URL.startswith(SENTINEL_SCHEMES):  # kombu's own form of the same thing
        CELERY_BROKER_SENTINEL_URL = CELERY_BROKER_URL  # as given (readyz pings the master through it)
        CELERY_BROKER_URL, _sentinel_options = redis_url.celery_broker(CELERY_BROKER_URL)
        CELERY_BROKER_TRANSPORT_OPTIONS.update(_sentinel_options)
# Every queue is declared, so a plain `celery -A config worker` (no -Q) consumes all of them; -Q
# still picks some (scaling per queue). Tasks without a queue of their own go to "celery".
CELERY_QUEUE_NAMES = ("celery", "async", "batch", "alerts", "analytics")
# Each with its own direct exchange and routing key, as Celery makes a queue named by -Q.
CELERY_TASK_QUEUES = tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in CELERY_QUEUE_NAMES)
CELERY_TASK_DEFAULT_QUEUE = "celery"
# Workers write a heartbeat this often (apps/core/workers.py); /readyz, the dashboard and the async
# 202 response read it to report queues with work waiting and no consumer.
CELERY_WORKER_HEARTBEAT_S = env.float("CELERY_WORKER_HEARTBEAT_S", default=10.0)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 600
CELERY_TASK_SOFT_TIME_LIMIT = 540
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE: dict = {}

# --- gateway ----------------------------------------------------------------------------------
# Seconds an authenticated key stays cached in process; revocation reaches every instance within it.
GATEWAY_AUTH_CACHE_TTL_S = env.float("GATEWAY_AUTH_CACHE_TTL_S", default=1.0)
# Seconds the routing table (aliases, deployments, prices) stays cached in process.
GATEWAY_ROUTES_CACHE_TTL_S = env.float("GATEWAY_ROUTES_CACHE_TTL_S", default=2.0)
# "native" (non-streaming calls through apps/gateway/h1.py, streams through httpx over aiohttp;
# fastest), "aiohttp" (non-streaming calls on aiohttp directly), "httpx-aiohttp" (all through httpx
# over an aiohttp transport) or "httpx" (plain httpx pool). See apps/gateway/http.py and
# docs/benchmark.md.
GATEWAY_HTTP_TRANSPORT = env("GATEWAY_HTTP_TRANSPORT", default="native")
if GATEWAY_HTTP_TRANSPORT not in ("native", "aiohttp", "httpx-aiohttp", "httpx"):
    raise ImproperlyConfigured(f"GATEWAY_HTTP_TRANSPORT={GATEWAY_HTTP_TRANSPORT!r}: native, aiohttp, httpx-aiohttp "
                               "or httpx")
GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S = env.float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT_S", default=5.0)
GATEWAY_UPSTREAM_READ_TIMEOUT_S = env.float("GATEWAY_UPSTREAM_READ_TIMEOUT_S", default=120.0)
# A stream whose upstream sends nothing for this long ends with an error event (a stalled stream).
GATEWAY_STREAM_IDLE_TIMEOUT_S = env.float("GATEWAY_STREAM_IDLE_TIMEOUT_S", default=30.0)
# Embedded mode (no REDIS_URL): the admission counters live in this SQLite file, shared by the web
# and worker processes.
GATEWAY_STATE_PATH = env("GATEWAY_STATE_PATH", default=str(VAR_DIR / "state.sqlite3"))
# Beat: how often the budget counters are reconciled with the ledger.
BUDGET_RECONCILE_INTERVAL_S = env.float("BUDGET_RECONCILE_INTERVAL_S", default=300.0)
# Admission. Requests with metadata.priority below 5 may use only this share of each rate limit.
GATEWAY_LOW_PRIORITY_SHARE = env.float("GATEWAY_LOW_PRIORITY_SHARE", default=0.8)
# How long a budget hold lives if its request never settles (a crashed process).
GATEWAY_HOLD_TTL_S = env.int("GATEWAY_HOLD_TTL_S", default=900)
# An async request's hold waits for a worker (queue, leases, retries): it is settled or released
# by that worker (or when the work is given up), so it may live much longer.
GATEWAY_ASYNC_HOLD_TTL_S = env.int("GATEWAY_ASYNC_HOLD_TTL_S", default=86_400)
# When Redis cannot be reached: "open" admits without the limit, "closed" answers 503.
GATEWAY_RATE_LIMIT_ON_STATE_ERROR = env("GATEWAY_RATE_LIMIT_ON_STATE_ERROR", default="open")
GATEWAY_BUDGET_ON_STATE_ERROR = env("GATEWAY_BUDGET_ON_STATE_ERROR", default="closed")
# The ledger write in the ASGI server on PostgreSQL (apps/analytics/services.usage_event_record;
# figures and what each guarantees in docs/benchmark.md): "journal" (default) writes the row to the
# local ledger journal before the answer and group-commits it to the database after; "batch"
# group-commits it to the database before the answer; "single" one insert per row; "orm" the ORM in
# the sync thread; "redis-stream" is an experiment that is durable only as far as Redis is.
GATEWAY_LEDGER_WRITER = env("GATEWAY_LEDGER_WRITER", default="journal")
if GATEWAY_LEDGER_WRITER not in ("journal", "batch", "single", "orm", "redis-stream"):
    raise ImproperlyConfigured("GATEWAY_LEDGER_WRITER: journal, batch, single, orm or redis-stream")
# GATEWAY_LEDGER_WRITER=journal: false (the default) writes the row to the journal before the answer
# (it survives the gateway process killed, and PostgreSQL down) and fsyncs it only if it does not reach
# the ledger; true also fsyncs it before the answer (a machine crash between the answer and the
# ledger commit, about a millisecond, loses nothing either). Figures in docs/benchmark.md.
LEDGER_JOURNAL_FIRST_FSYNC = env.bool("LEDGER_JOURNAL_FIRST_FSYNC", default=False)
# PostgreSQL's synchronous_commit on the ledger writer's connections: on (the default: a 2xx's row is
# on disk), off (a PostgreSQL or machine crash may lose the last ~0.6 s of rows; a killed gateway loses none).
GATEWAY_LEDGER_SYNCHRONOUS_COMMIT = env.str("GATEWAY_LEDGER_SYNCHRONOUS_COMMIT", default="on")
if GATEWAY_LEDGER_SYNCHRONOUS_COMMIT not in ("on", "off", "local", "remote_write", "remote_apply"):
    raise ImproperlyConfigured("GATEWAY_LEDGER_SYNCHRONOUS_COMMIT: on, off, local, remote_write or remote_apply")
# A ledger row the database cannot take (unreachable, shut down, pool timeout) is appended to a
# local journal (fsync'ed) and replayed when the database is back (apps/analytics/journal.py).
LEDGER_JOURNAL_DIR = env("LEDGER_JOURNAL_DIR", default=str(VAR_DIR / "ledger-journal"))
LEDGER_JOURNAL_SEGMENT_BYTES = env.int("LEDGER_JOURNAL_SEGMENT_BYTES", default=16 * 1024 * 1024)
# GATEWAY_LEDGER_WRITER=journal: a segment of rows journaled first is closed after this many seconds
# (or idle this long with every row in the ledger), and deleted once every row is in the ledger.
LEDGER_PENDING_SEGMENT_S = env.float("LEDGER_PENDING_SEGMENT_S", default=1.0)
# After a failed write, rows go straight to the journal for this long (nobody waits on a dead database).
LEDGER_JOURNAL_SKIP_DB_S = env.float("LEDGER_JOURNAL_SKIP_DB_S", default=2.0)
# The gateway's background replay: first try after this delay, doubling up to the max, this many tries.
LEDGER_REPLAY_BACKOFF_S = env.float("LEDGER_REPLAY_BACKOFF_S", default=1.0)
LEDGER_REPLAY_BACKOFF_MAX_S = env.float("LEDGER_REPLAY_BACKOFF_MAX_S", default=30.0)
LEDGER_REPLAY_ATTEMPTS = env.int("LEDGER_REPLAY_ATTEMPTS", default=30)
# Celery beat replays the journal of the worker's host this often (0: never).
LEDGER_REPLAY_EVERY_S = env.float("LEDGER_REPLAY_EVERY_S", default=30.0)
if LEDGER_REPLAY_EVERY_S > 0:
    CELERY_BEAT_SCHEDULE["analytics-ledger-replay"] = {
        "task": "analytics.ledger_replay", "schedule": LEDGER_REPLAY_EVERY_S,
        "options": {"queue": "analytics", "expires": LEDGER_REPLAY_EVERY_S}}
# OpenTelemetry traces (apps/gateway/tracing.py): off unless an OTLP endpoint (or OTEL_TRACES_EXPORTER
# =otlp) is configured by the standard OTEL_* variables, which the SDK itself reads (endpoint, headers,
# service name, resource attributes, sampler); OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none
# turns them off.
OTEL_TRACES_ENABLED = (
    not env.bool("OTEL_SDK_DISABLED", default=False)
    and env("OTEL_TRACES_EXPORTER", default="") != "none"
    and bool(env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", default="") or env("OTEL_EXPORTER_OTLP_ENDPOINT", default="")
             or "otlp" in env("OTEL_TRACES_EXPORTER", default=""))
)
# Operational alerts (apps/gateway/ops_alerts.py), checked by beat every OPS_ALERT_CHECK_EVERY_S:
# a provider whose upstream attempts over the last OPS_ALERT_WINDOW_S fail at OPS_ALERT_ERROR_RATE or
# more (with at least OPS_ALERT_MIN_ATTEMPTS calls) or take OPS_ALERT_LATENCY_MS on average, a
# deployment cooling down, async or batch work waiting longer than OPS_ALERT_QUEUE_WAIT_S. Sent once
# when it opens and once when it resolves, to the emails, a signed webhook and a Slack-compatible
# incoming webhook, each optional.
OPS_ALERT_CHECK_EVERY_S = env.float("OPS_ALERT_CHECK_EVERY_S", default=60.0)
OPS_ALERT_WINDOW_S = env.int("OPS_ALERT_WINDOW_S", default=300)
OPS_ALERT_ERROR_RATE = env.float("OPS_ALERT_ERROR_RATE", default=0.5)
OPS_ALERT_MIN_ATTEMPTS = env.int("OPS_ALERT_MIN_ATTEMPTS", default=5)
OPS_ALERT_LATENCY_MS = env.int("OPS_ALERT_LATENCY_MS", default=20_000)
OPS_ALERT_QUEUE_WAIT_S = env.int("OPS_ALERT_QUEUE_WAIT_S", default=600)
OPS_ALERT_EMAILS = env.list("OPS_ALERT_EMAILS", default=[])
OPS_ALERT_WEBHOOK_URL = env("OPS_ALERT_WEBHOOK_URL", default="")
OPS_ALERT_WEBHOOK_SECRET = env("OPS_ALERT_WEBHOOK_SECRET", default="")
OPS_ALERT_SLACK_WEBHOOK_URL = env("OPS_ALERT_SLACK_WEBHOOK_URL", default="")
if OPS_ALERT_CHECK_EVERY_S > 0:
    CELERY_BEAT_SCHEDULE["gateway-ops-alerts"] = {
        "task": "gateway.ops_alerts_check", "schedule": OPS_ALERT_CHECK_EVERY_S,
        "options": {"queue": "alerts", "expires": OPS_ALERT_CHECK_EVERY_S}}
# The usage-event stream (apps/analytics/usage_stream.py): tenants' usage events pushed to their
# webhooks in batches of up to USAGE_STREAM_BATCH_MAX, every USAGE_STREAM_EVERY_S (0: never).
USAGE_STREAM_EVERY_S = env.float("USAGE_STREAM_EVERY_S", default=5.0)
USAGE_STREAM_BATCH_MAX = env.int("USAGE_STREAM_BATCH_MAX", default=500)
USAGE_STREAM_TIMEOUT_S = env.float("USAGE_STREAM_TIMEOUT_S", default=10.0)
USAGE_STREAM_BACKOFF_MAX_S = env.int("USAGE_STREAM_BACKOFF_MAX_S", default=300)
if USAGE_STREAM_EVERY_S > 0:
    CELERY_BEAT_SCHEDULE["analytics-usage-streams"] = {
        "task": "analytics.usage_streams_deliver", "schedule": USAGE_STREAM_EVERY_S,
        "options": {"queue": "analytics", "expires": USAGE_STREAM_EVERY_S}}
# Request logs (apps/analytics/request_logs.py), for the tenants that turn them on: each body is
# capped to this many bytes; these regular expressions (JSON list) are redacted besides the built-in
# API-key and bearer-token ones; logs of a tenant without a policy any more are kept this long.
REQUEST_LOG_MAX_BODY_BYTES = env.int("REQUEST_LOG_MAX_BODY_BYTES", default=64 * 1024)
REQUEST_LOG_REDACT_PATTERNS = env.json("REQUEST_LOG_REDACT_PATTERNS", default=[])
REQUEST_LOG_DEFAULT_RETENTION_DAYS = env.int("REQUEST_LOG_DEFAULT_RETENTION_DAYS", default=30)
REQUEST_LOG_PURGE_EVERY_S = env.float("REQUEST_LOG_PURGE_EVERY_S", default=3600.0)
if REQUEST_LOG_PURGE_EVERY_S > 0:
    CELERY_BEAT_SCHEDULE["analytics-request-logs-purge"] = {
        "task": "analytics.request_logs_purge", "schedule": REQUEST_LOG_PURGE_EVERY_S,
        "options": {"queue": "analytics", "expires": REQUEST_LOG_PURGE_EVERY_S}}
GATEWAY_PG_POOL_MIN = env.int("GATEWAY_PG_POOL_MIN", default=2)
GATEWAY_PG_POOL_MAX = env.int("GATEWAY_PG_POOL_MAX", default=16)
GATEWAY_PG_POOL_TIMEOUT_S = env.float("GATEWAY_PG_POOL_TIMEOUT_S", default=10.0)
GATEWAY_MAX_BODY_BYTES = env.int("GATEWAY_MAX_BODY_BYTES", default=4 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = max(GATEWAY_MAX_BODY_BYTES, 2_621_440)

# --- auth, i18n, static -----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
# Password guessing: django-axes counts failed logins on every path that calls Django's authenticate()
# (admin, /accounts/login/, HTTP Basic on /api/) by username and by client address; after
# AXES_FAILURE_LIMIT failures either one is refused, even with the right password, for AXES_COOLOFF_S
# seconds after its last counted failure. Attempts live in the database: every instance shares them.
# (AUTHENTICATION_BACKENDS, with axes first, is set with single sign-on below.)
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=10)
AXES_COOLOFF_TIME = timedelta(seconds=env.int("AXES_COOLOFF_S", default=900))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
# Attempts during a lockout do not extend it: the cool-off always lets the owner back in.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_COOLOFF_MESSAGE = "Too many failed logins for this account or from this address. Try again later."
# The client address is REMOTE_ADDR (as for /v1's failure counts and /metrics): behind a proxy, the
# ASGI server sets it from X-Forwarded-For (uvicorn --forwarded-allow-ips; README "Running in production").
AXES_VERBOSE = False
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/dashboard/"
LOGOUT_REDIRECT_URL = "/accounts/login/"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").exists() else []

# HTTP Basic (a person's password) on /api/: on by default in the embedded profile, off in
# production, where scripts use management API tokens.
API_BASIC_AUTH_ENABLED = env.bool("API_BASIC_AUTH_ENABLED", default=not PRODUCTION)
REST_FRAMEWORK = {
    # apps/keys/restapi.py, restschema.py: error responses documented, database refusals as 400/409 (never 500),
    # bounded pagination.
    "DEFAULT_SCHEMA_CLASS": "apps.keys.restschema.ApiAutoSchema",
    "EXCEPTION_HANDLER": "apps.keys.restapi.api_exception_handler",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        # `Authorization: Bearer llmt_...` (or `Token llmt_...`): management API tokens (apps/keys/api_tokens.py)
        "apps.keys.api_tokens.ManagementTokenAuthentication",
    ] + (["apps.keys.logins.BasicAuthentication"]  # DRF's, answering 429 while axes locks the login out
         if API_BASIC_AUTH_ENABLED else []),
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "apps.keys.restapi.ApiPagination",
    "PAGE_SIZE": 100,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM Service management API",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "ENUM_NAME_OVERRIDES": {"ManagementTokenKindEnum": "apps.keys.models.ManagementToken.Kind"},
}

EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="llm-service@localhost")
EMAIL_FILE_PATH = env("EMAIL_FILE_PATH", default=str(BASE_DIR / "var" / "mail"))  # filebased backend

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    # httpx logs every upstream request at INFO: a cost on every gateway request.
    "loggers": {"django.request": {"level": "ERROR"}, "httpx": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}

# --- routing (apps/gateway/router.py, cooldown.py; see docs/providers.md) -----------------------
# Retries on the same deployment after a retryable error, before falling back to the next one.
GATEWAY_RETRIES_PER_DEPLOYMENT = env.int("GATEWAY_RETRIES_PER_DEPLOYMENT", default=1)
# Upstream attempts per request over all deployments, and the deadline of the whole call loop.
GATEWAY_MAX_ATTEMPTS = env.int("GATEWAY_MAX_ATTEMPTS", default=6)
GATEWAY_TOTAL_DEADLINE_S = env.float("GATEWAY_TOTAL_DEADLINE_S", default=60.0)
# A deployment failing GATEWAY_COOLDOWN_FAILURES times within GATEWAY_COOLDOWN_WINDOW_S is skipped
# by every instance for GATEWAY_COOLDOWN_S.
GATEWAY_COOLDOWN_FAILURES = env.int("GATEWAY_COOLDOWN_FAILURES", default=3)
GATEWAY_COOLDOWN_WINDOW_S = env.float("GATEWAY_COOLDOWN_WINDOW_S", default=60.0)
GATEWAY_COOLDOWN_S = env.float("GATEWAY_COOLDOWN_S", default=30.0)
# How long an instance trusts its copy of the shared cooldown state before reading Redis again (a
# cooldown another instance sets is honoured here within this time; 0 reads Redis every request).
GATEWAY_COOLDOWN_CHECK_CACHE_S = env.float("GATEWAY_COOLDOWN_CHECK_CACHE_S", default=0.5)
# Seconds between availability probes of every deployment (Celery beat); 0 turns them off.
GATEWAY_PROBE_INTERVAL_S = env.float("GATEWAY_PROBE_INTERVAL_S", default=300.0)
if GATEWAY_PROBE_INTERVAL_S > 0:
    CELERY_BEAT_SCHEDULE["gateway-deployments-probe"] = {
        "task": "gateway.deployments_probe", "schedule": GATEWAY_PROBE_INTERVAL_S}

# --- response cache, key lifecycle, security events (docs/cache-and-keys.md) ----------------------
GATEWAY_CACHE_ENABLED = env.bool("GATEWAY_CACHE_ENABLED", default=True)
# "redis" (when REDIS_URL is set) or "memory" (an LRU in each process).
GATEWAY_CACHE_BACKEND = env("GATEWAY_CACHE_BACKEND", default="redis" if REDIS_URL else "memory")
GATEWAY_CACHE_TIMEOUT_S = env.float("GATEWAY_CACHE_TIMEOUT_S", default=REDIS_TIMEOUT_S)
GATEWAY_CACHE_MAX_ENTRIES = env.int("GATEWAY_CACHE_MAX_ENTRIES", default=10_000)
GATEWAY_CACHE_MAX_ENTRY_BYTES = env.int("GATEWAY_CACHE_MAX_ENTRY_BYTES", default=256 * 1024)
# Semantic cache (apps/gateway/semantic.py; docs/cache-and-keys.md): opt-in per tenant or key.
GATEWAY_SEMANTIC_CACHE_ENABLED = env.bool("GATEWAY_SEMANTIC_CACHE_ENABLED", default=True)
# "auto": pgvector when the PostgreSQL server has the extension, else "index" (rows in the database,
# searched with an in-process usearch index per tenant); "pgvector" or "index" to force one.
GATEWAY_SEMANTIC_CACHE_STORE = env("GATEWAY_SEMANTIC_CACHE_STORE", default="auto")
GATEWAY_SEMANTIC_CACHE_THRESHOLD = Decimal(env("GATEWAY_SEMANTIC_CACHE_THRESHOLD", default="0.95"))
GATEWAY_SEMANTIC_CACHE_MAX_INDEXES = env.int("GATEWAY_SEMANTIC_CACHE_MAX_INDEXES", default=1000)
# last_used_at is collected in process and written in bulk at most this often (never per request).
GATEWAY_LAST_USED_FLUSH_S = env.float("GATEWAY_LAST_USED_FLUSH_S", default=30.0)
# Failed API-key authentications, counted per (key prefix, client address) and per client address
# whatever the prefix (in Redis when REDIS_URL is set, shared by every instance): one audit row
# (`auth_failure_burst`) per window once a count reaches the threshold.
GATEWAY_AUTH_FAILURE_BURST = env.int("GATEWAY_AUTH_FAILURE_BURST", default=5)
GATEWAY_AUTH_FAILURE_WINDOW_S = env.int("GATEWAY_AUTH_FAILURE_WINDOW_S", default=60)
# --- analytics, dashboards, metrics (issue 7) -------------------------------------------------
# Hours of ledger the rollup beat task recomputes each run (late rows older than this need
# `manage.py analytics_rollup --since ...`).
ANALYTICS_ROLLUP_LOOKBACK_H = env.int("ANALYTICS_ROLLUP_LOOKBACK_H", default=3)
ANALYTICS_ROLLUP_EVERY_S = env.float("ANALYTICS_ROLLUP_EVERY_S", default=60.0)
CELERY_BEAT_SCHEDULE["analytics-rollup-recent"] = {
    "task": "analytics.usage_rollup_recent",
    "schedule": ANALYTICS_ROLLUP_EVERY_S,
    "options": {"queue": "analytics", "expires": ANALYTICS_ROLLUP_EVERY_S},
}
# --- the ledger at scale (docs/ledger-at-scale.md) ----------------------------------------------
# PostgreSQL: monthly partitions created ahead, beyond the current month, by migrate and beat.
LEDGER_PARTITIONS_AHEAD = env.int("LEDGER_PARTITIONS_AHEAD", default=3)
# Retention of detailed ledger rows, in whole UTC months before the current one (0: forever); a
# tenant's own setting (LedgerRetention, in the admin) overrides it. Rollups are kept forever.
LEDGER_RETENTION_MONTHS = env.int("LEDGER_RETENTION_MONTHS", default=0)
# Where archived months go: a local directory (path or file:///path) or s3://bucket/prefix.
LEDGER_ARCHIVE_URL = env("LEDGER_ARCHIVE_URL", default=str(VAR_DIR / "ledger-archive"))
# How a month is archived: gzip'ed CSV ("csv") or Parquet ("parquet", zstd, typed columns).
LEDGER_ARCHIVE_FORMAT = env("LEDGER_ARCHIVE_FORMAT", default="csv")
# S3-compatible storage (credentials from the usual AWS_* variables or the instance's role).
LEDGER_ARCHIVE_S3_ENDPOINT_URL = env("LEDGER_ARCHIVE_S3_ENDPOINT_URL", default="")
LEDGER_ARCHIVE_S3_REGION = env("LEDGER_ARCHIVE_S3_REGION", default="us-east-1")
CELERY_BEAT_SCHEDULE["analytics-ledger-upkeep"] = {
    "task": "analytics.ledger_upkeep", "schedule": env.float("LEDGER_UPKEEP_EVERY_S", default=3600.0),
    "options": {"queue": "analytics"}}
INSTALLED_APPS += ["drf_spectacular_sidecar"]
SPECTACULAR_SETTINGS.update({
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
})
# Serve /static/ from the app itself (finders, no collectstatic needed) so the embedded mode
# works offline under uvicorn; behind a CDN or nginx in production set this False.
SERVE_STATIC = env.bool("SERVE_STATIC", default=True)
# --- outbound webhooks (budget alerts, callback_url; apps/keys/outbound.py) ----------------------
# Webhooks only go to public addresses. Internal receivers an operator trusts: host names (exact)
# or CIDRs, comma-separated, e.g. "hooks.internal,10.20.0.0/16". Every webhook carries
# `X-LLM-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` keyed with the tenant's
# webhook secret (Tenant.webhook_secret_encrypted).
WEBHOOK_ALLOWED_HOSTS = env.list("WEBHOOK_ALLOWED_HOSTS", default=[])
# --- budget alerts ------------------------------------------------------------------------------
ALERT_WEBHOOK_TIMEOUT_S = env.float("ALERT_WEBHOOK_TIMEOUT_S", default=10.0)
# Delivery retries: base * 2**attempt seconds, capped.
ALERT_RETRY_BASE_S = env.int("ALERT_RETRY_BASE_S", default=10)
ALERT_RETRY_MAX_S = env.int("ALERT_RETRY_MAX_S", default=900)
# A forecast alert needs this fraction of the period elapsed (avoids extrapolating one early request).
BUDGET_FORECAST_MIN_ELAPSED = env.float("BUDGET_FORECAST_MIN_ELAPSED", default=0.1)
# Seconds the budgets' alert thresholds stay cached in each gateway process.
BUDGET_ALERT_CONFIG_TTL_S = env.float("BUDGET_ALERT_CONFIG_TTL_S", default=10.0)
# --- async requests and batches (apps/gateway/async_requests.py, batches.py) --------------------
# Seconds a finished async request (result, error, usage) is kept before the purge task deletes it.
GATEWAY_ASYNC_RESULT_TTL_S = env.int("GATEWAY_ASYNC_RESULT_TTL_S", default=7 * 24 * 3600)
# Seconds a Responses API answer sent with `store: true` is kept (for previous_response_id, GET and
# DELETE /v1/responses/{id}); 0 turns storing off (`store: true` is then refused).
GATEWAY_RESPONSES_STORE_TTL_S = env.int("GATEWAY_RESPONSES_STORE_TTL_S", default=30 * 24 * 3600)
# Seconds a worker owns an async request or batch line it claimed; past it, the resume sweep
# hands the work to another worker (a worker killed mid-task). Longer than one upstream call.
GATEWAY_JOB_LEASE_S = env.float("GATEWAY_JOB_LEASE_S", default=600.0)
# Claims of one request or line before it is given up as failed (`worker_failed`).
GATEWAY_JOB_MAX_ATTEMPTS = env.int("GATEWAY_JOB_MAX_ATTEMPTS", default=5)
GATEWAY_JOBS_RESUME_EVERY_S = env.float("GATEWAY_JOBS_RESUME_EVERY_S", default=30.0)
GATEWAY_JOBS_PURGE_EVERY_S = env.float("GATEWAY_JOBS_PURGE_EVERY_S", default=3600.0)
# Lines of one batch in flight at once (Celery tasks working through the batch side by side).
GATEWAY_BATCH_CONCURRENCY = env.int("GATEWAY_BATCH_CONCURRENCY", default=4)
# Seconds one batch task works before handing over to a fresh task (stays under the time limits).
GATEWAY_BATCH_TASK_BUDGET_S = env.float("GATEWAY_BATCH_TASK_BUDGET_S", default=60.0)
# Provider batch APIs (Deployment.provider_batch): how often an upstream batch is polled, and how
# long the budget hold of a line sent there lasts (the provider's 24 h window, with a margin).
GATEWAY_PROVIDER_BATCH_POLL_S = env.float("GATEWAY_PROVIDER_BATCH_POLL_S", default=60.0)
GATEWAY_PROVIDER_BATCH_HOLD_TTL_S = env.int("GATEWAY_PROVIDER_BATCH_HOLD_TTL_S", default=172_800)
GATEWAY_FILE_MAX_BYTES = env.int("GATEWAY_FILE_MAX_BYTES", default=100 * 1024 * 1024)
GATEWAY_BATCH_MAX_LINES = env.int("GATEWAY_BATCH_MAX_LINES", default=50_000)
GATEWAY_WEBHOOK_TIMEOUT_S = env.float("GATEWAY_WEBHOOK_TIMEOUT_S", default=10.0)
GATEWAY_WEBHOOK_MAX_RETRIES = env.int("GATEWAY_WEBHOOK_MAX_RETRIES", default=8)
CELERY_BEAT_SCHEDULE.update({
    "gateway-jobs-resume": {"task": "apps.gateway.tasks.jobs_resume", "schedule": GATEWAY_JOBS_RESUME_EVERY_S,
                            "options": {"queue": "async"}},
    "gateway-async-requests-purge": {"task": "apps.gateway.tasks.async_requests_purge",
                                     "schedule": GATEWAY_JOBS_PURGE_EVERY_S, "options": {"queue": "async"}},
    "gateway-stored-responses-purge": {"task": "apps.gateway.tasks.stored_responses_purge",
                                       "schedule": GATEWAY_JOBS_PURGE_EVERY_S, "options": {"queue": "async"}},
    "gateway-semantic-cache-purge": {"task": "apps.gateway.tasks.semantic_cache_purge",
                                     "schedule": GATEWAY_JOBS_PURGE_EVERY_S, "options": {"queue": "async"}},
})
# /metrics names every tenant and budget: with a token, scrapes send `Authorization: Bearer <token>`
# (Prometheus: `authorization: {credentials: ...}`); without one, only loopback may scrape.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
CELERY_BEAT_SCHEDULE["billing-budget-counters-reconcile"] = {
    "task": "billing.budget_counters_reconcile", "schedule": BUDGET_RECONCILE_INTERVAL_S}
# --- single sign-on: OpenID Connect (apps/keys/sso.py, docs/governance-and-analytics.md) ---------
# Off unless OIDC_ISSUER is set. Endpoints come from the issuer's discovery document (fetched on
# first use, cached OIDC_DISCOVERY_TTL_S) unless set explicitly below.
OIDC_ISSUER = env("OIDC_ISSUER", default="")
SSO_ENABLED = bool(OIDC_ISSUER)
OIDC_RP_CLIENT_ID = env("OIDC_CLIENT_ID", default="")
if SSO_ENABLED and not OIDC_RP_CLIENT_ID:
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured("OIDC_ISSUER is set: set OIDC_CLIENT_ID (and OIDC_CLIENT_SECRET) too")
OIDC_RP_CLIENT_SECRET = env("OIDC_CLIENT_SECRET", default="")
OIDC_RP_SCOPES = env("OIDC_SCOPES", default="openid email profile")
OIDC_RP_SIGN_ALGO = env("OIDC_SIGN_ALGO", default="RS256")
OIDC_OP_AUTHORIZATION_ENDPOINT = env("OIDC_AUTHORIZATION_ENDPOINT", default="")
OIDC_OP_TOKEN_ENDPOINT = env("OIDC_TOKEN_ENDPOINT", default="")
OIDC_OP_USER_ENDPOINT = env("OIDC_USERINFO_ENDPOINT", default="")
OIDC_OP_JWKS_ENDPOINT = env("OIDC_JWKS_ENDPOINT", default="")
OIDC_DISCOVERY_TTL_S = env.float("OIDC_DISCOVERY_TTL_S", default=3600.0)
OIDC_TIMEOUT = env.float("OIDC_TIMEOUT_S", default=10.0)
OIDC_USE_PKCE = env.bool("OIDC_USE_PKCE", default=True)
# The claim listing `tenant:role` values (e.g. "acme:manager"); memberships follow it at each login.
OIDC_TENANT_CLAIM = env("OIDC_TENANT_CLAIM", default="groups")
# A value of that claim that makes the user a superuser (unset: SSO never grants or takes it).
OIDC_SUPERUSER_VALUE = env("OIDC_SUPERUSER_VALUE", default="")
OIDC_AUTHENTICATION_CALLBACK_URL = "sso_callback"
LOGIN_REDIRECT_URL_FAILURE = "/accounts/login/?sso_error=1"
# Password login (the login page, /admin/login/, the API's basic auth) can be switched off only
# when SSO is on: without it nobody could log in.
PASSWORD_LOGIN_ENABLED = env.bool("PASSWORD_LOGIN_ENABLED", default=True) or not SSO_ENABLED
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend"] + (
    ["apps.keys.sso.TenantOIDCBackend"] if SSO_ENABLED else []) + (
    ["django.contrib.auth.backends.ModelBackend"] if PASSWORD_LOGIN_ENABLED else [])
