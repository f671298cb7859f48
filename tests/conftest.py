"""Shared fixtures: a fake OpenAI-compatible upstream, a live gateway (uvicorn, ASGI) in a thread,
and a tenant with a key and a model routed to the fake upstream.

Against PostgreSQL and Redis when DATABASE_URL / REDIS_URL are set (CI), SQLite otherwise.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

import pytest
from django.conf import settings

from apps.analytics.services import ledger_writers_release
from apps.billing import alerts
from apps.billing.budgets import open_holds
from apps.core import caches
from apps.core import db as core_db
from apps.core.state import EPOCH_KEY
from apps.gateway import cooldown, pipeline, router, selectors
from tests import factories as f
from tests import redis_servers
from tests.fakes.openai_server import FakeOpenAI

# The embedded admission state of this test session (and of the workers and gateways it starts),
# never the demo's var/state.sqlite3.
_STATE_PATH = os.path.join(tempfile.mkdtemp(prefix="llms-state-"), "state.sqlite3")
os.environ["GATEWAY_STATE_PATH"] = settings.GATEWAY_STATE_PATH = _STATE_PATH
# Likewise the ledger journal: rows of the test database never land in var/ledger-journal, where a
# replay (a demo's start, the bench) would put them in another database.
os.environ["LEDGER_JOURNAL_DIR"] = settings.LEDGER_JOURNAL_DIR = tempfile.mkdtemp(prefix="llms-journal-")


def redis_flush() -> None:
    """Empty the test Redis database, and mark the counters as kept on this server (as a gateway
    that validated it would), so a process started later does not rebuild them mid-test."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    client.set(EPOCH_KEY, client.info("server")["run_id"])


@pytest.fixture(autouse=True)
def _fresh_process_state(request):
    """In-process caches must not carry one test's keys or routes into the next."""
    pipeline._auth_cache.forget()
    caches.reset_all()
    cooldown.reset_local()
    router.latency_reset()
    alerts.alerts_state_reset()
    if settings.REDIS_URL:
        redis_flush()
    yield
    pipeline._auth_cache.forget()
    selectors.routing_table_invalidate()
    # A hold this process took (or took over) and never ended is a bug: the test fails on it.
    left = open_holds()
    if left and not request.node.get_closest_marker("holds_left_open"):
        pytest.fail(f"budget holds left open (never settled or released): {[h.request_id for h in left]}")


@pytest.fixture
async def server_loop(monkeypatch):
    """Run the test as the ASGI server's loop would: with its own async pool (a live gateway thread
    of the session keeps its own)."""
    for name in ("_server_loop", "_pool", "_pool_loop"):
        monkeypatch.setattr(core_db, name, None)
    core_db.server_loop_mark()
    yield
    if core_db._pool is not None:
        await ledger_writers_release()
        await core_db._pool.close()


@pytest.fixture
def failover_cluster(tmp_path):
    """A 3-master Redis Cluster with a replica per master, started for the test (skipped without
    the binaries)."""
    if redis_servers.needs_redis_cluster.args[0]:
        pytest.skip(redis_servers.needs_redis_cluster.kwargs["reason"])
    c = redis_servers.ClusterSet(tmp_path, replicas=True)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="session")
def fake_openai_server():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def upstream(fake_openai_server):
    fake_openai_server.requests.clear()
    fake_openai_server.before_answer = None
    return fake_openai_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayThread:
    """The real ASGI app under uvicorn, in a thread of the test process."""

    def __init__(self):
        import uvicorn

        from apps.analytics.services import ledger_writes_drain
        from apps.billing.budgets import settles_drain
        from config.asgi import application

        async def app(scope, receive, send):
            """The gateway, each part of whose answers waits for this server's ledger commits and
            budget settles (in production the answer does not wait for them: the row is in the
            local journal, apps.analytics.services.usage_event_record; apps.billing.budgets.Hold.settle),
            so a test reading the ledger, counters or alerts after an answer (a stream: after its
            [DONE], which a client may stop reading at) sees that answer's row and settle."""

            async def send_after_settles(message):
                if message["type"] == "http.response.body":
                    await ledger_writes_drain()
                    await settles_drain()
                await send(message)

            await application(scope, receive, send_after_settles)

        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", loop="asyncio")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="gateway")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def _gateway_thread(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        gw = GatewayThread().start()
    yield gw
    gw.stop()


@pytest.fixture
def live_gateway(transactional_db, _gateway_thread):
    """Base URL of a live gateway sharing the test database (transactional: threads see the data)."""
    return _gateway_thread.url


@dataclass
class Setup:
    tenant: object
    source: object
    key: object
    secret: str
    alias: str
    provider: object
    deployment: object
    price: object


def make_setup(upstream: FakeOpenAI | None = None, *, alias: str = "gpt-test", upstream_model: str = "gpt-up",
               kind: str = "openai_compatible", tenant=None, **key_kwargs) -> Setup:
    """A tenant with a source and key, and `alias` routed to the fake upstream (or the mock)."""
    tenant = tenant or f.TenantFactory()
    key = f.ApiKeyFactory(tenant=tenant, **key_kwargs)
    from apps.gateway.models import ModelAlias, Provider

    if kind == "mock" or upstream is None:
        provider = Provider.objects.filter(name="mock").first() or f.ProviderFactory(name="mock", kind="mock")
    else:
        provider = Provider.objects.filter(name="fake-openai").first() or f.ProviderFactory(
            name="fake-openai", kind=kind, api_base=upstream.base_url, credential=f.ProviderCredentialFactory())
    model_alias = ModelAlias.objects.filter(alias=alias).first() or f.ModelAliasFactory(alias=alias)
    deployment = f.DeploymentFactory(alias=model_alias, provider=provider, upstream_model=upstream_model)
    from apps.billing.models import Price

    price = Price.objects.filter(model=alias).first() or f.PriceFactory(
        model=alias, input_usd_per_mtok=Decimal("1.00"), output_usd_per_mtok=Decimal("2.00"))
    return Setup(tenant=tenant, source=key.source, key=key, secret=key.secret, alias=alias, provider=provider,
                 deployment=deployment, price=price)


@pytest.fixture
def setup(db, upstream) -> Setup:
    return make_setup(upstream)


@pytest.fixture
def live_setup(live_gateway, upstream) -> Setup:
    return make_setup(upstream)


def _database_url_for_subprocess() -> str:
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{host}:{port}/{db['NAME']}"


requires_shared_state = pytest.mark.skipif(
    not (settings.IS_POSTGRES and settings.REDIS_URL),
    reason="several gateway instances share state only on PostgreSQL and Redis",
)


@pytest.fixture
def gateway_instances(transactional_db):
    """Start gateway processes (uvicorn, production settings) on the test database and Redis.
    `start(n)` returns their base URLs; all are stopped after the test."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    procs = []

    def start(n: int = 2, **extra_env) -> list[str]:
        env = {**os.environ, "DATABASE_URL": _database_url_for_subprocess(), "REDIS_URL": settings.REDIS_URL,
               **{k: str(v) for k, v in extra_env.items()}}
        urls = []
        for _ in range(n):
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port),
                 "--log-level", "warning"],
                cwd=Path(__file__).resolve().parent.parent, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        for url in urls:
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway at {url} did not start")
                time.sleep(0.05)
        return urls

    yield start
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except Exception:
            p.kill()


# --- provider fakes (one per wire format; see tests/fakes/) -----------------------------------


@pytest.fixture(scope="session")
def _fake_anthropic_server():
    from tests.fakes.anthropic_server import FakeAnthropic

    server = FakeAnthropic().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _fake_gemini_server():
    from tests.fakes.gemini_server import FakeGemini

    server = FakeGemini().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _fake_azure_server():
    from tests.fakes.azure_server import FakeAzureOpenAI

    server = FakeAzureOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def anthropic_upstream(_fake_anthropic_server):
    _fake_anthropic_server.requests.clear()
    return _fake_anthropic_server


@pytest.fixture
def gemini_upstream(_fake_gemini_server):
    _fake_gemini_server.requests.clear()
    return _fake_gemini_server


@pytest.fixture
def azure_upstream(_fake_azure_server):
    _fake_azure_server.requests.clear()
    return _fake_azure_server

@pytest.fixture(autouse=True)
def _fresh_cache_and_key_state():
    """The response cache (in process), collected last-use times and auth-failure counters."""
    from apps.gateway import cache
    from apps.keys import last_used, security

    cache.cache_reset()
    last_used.reset()
    security.reset()
    yield
    cache.cache_reset()
    last_used.reset()
    security.reset()


class GatewayProcess:
    """Another gateway instance in its own process (uvicorn), on the test database and Redis: what
    one instance caches in process, the other does not see."""

    def __init__(self):
        self.port = _free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        import os
        import subprocess
        import sys

        import httpx
        from django.db import connection

        db = connection.settings_dict
        if settings.IS_POSTGRES:
            auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
            database_url = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        else:
            database_url = f"sqlite:///{db['NAME']}"
        env = {**os.environ, "DATABASE_URL": database_url, "DJANGO_SETTINGS_MODULE": "config.settings"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--lifespan", "off"],
            env=env, cwd=str(settings.BASE_DIR),
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the second gateway process exited")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the second gateway process did not start")
            time.sleep(0.05)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()


@pytest.fixture(scope="session")
def _gateway_process(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        gw = GatewayProcess().start()
    yield gw
    gw.stop()


@pytest.fixture
def gateway_process(transactional_db, _gateway_process):
    """A second live gateway, in another process, sharing the test database (transactional)."""
    return _gateway_process.url
@pytest.fixture
def world(db):
    """Two tenants (acme, globex) with an owner, admin, manager and viewer, sources, keys, budgets."""
    from tests.keys.personas import make_world

    return make_world()


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    """Factories set passwords for every persona: a cheap hasher keeps the suite fast."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def shared_state_at():
    """`with shared_state_at(url):` points this process's shared state (admission, cooldowns,
    cache) at another Redis, e.g. one the test stops or that never answers."""
    from contextlib import contextmanager

    from django.test import override_settings

    @contextmanager
    def use(url: str):
        with override_settings(REDIS_URL=url):
            caches.reset_all()
            try:
                yield
            finally:
                caches.reset_all()
        caches.reset_all()

    return use
@pytest.fixture(scope="session")
def _oidc_server():
    from tests.fakes.oidc_provider import FakeOIDCProvider

    provider = FakeOIDCProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def sso_provider(_oidc_server, settings):
    """A real OpenID Connect provider on loopback, with SSO switched on against it (as OIDC_ISSUER,
    OIDC_CLIENT_ID and OIDC_CLIENT_SECRET in the environment would). Set `.claims` for the user
    the provider logs in."""
    from apps.keys import sso
    from tests.fakes.oidc_provider import CLIENT_ID, CLIENT_SECRET

    _oidc_server.reset()
    sso.discovery_reset()
    settings.OIDC_ISSUER = _oidc_server.issuer
    settings.SSO_ENABLED = True
    settings.OIDC_RP_CLIENT_ID = CLIENT_ID
    settings.OIDC_RP_CLIENT_SECRET = CLIENT_SECRET
    settings.OIDC_RP_SCOPES = "openid email profile groups"
    settings.OIDC_TENANT_CLAIM = "groups"
    settings.OIDC_SUPERUSER_VALUE = ""
    settings.PASSWORD_LOGIN_ENABLED = True
    settings.AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "apps.keys.sso.TenantOIDCBackend",
                                        "django.contrib.auth.backends.ModelBackend"]
    yield _oidc_server
    sso.discovery_reset()


@pytest.fixture(scope="session")
def _fake_bedrock_server():
    from tests.fakes.bedrock_server import FakeBedrock

    server = FakeBedrock().start()
    yield server
    server.stop()


@pytest.fixture
def bedrock_upstream(_fake_bedrock_server):
    _fake_bedrock_server.requests.clear()
    return _fake_bedrock_server


@pytest.fixture(scope="session")
def _fake_vertex_server():
    from tests.fakes.vertex_server import FakeVertex

    server = FakeVertex().start()
    yield server
    server.stop()


@pytest.fixture
def vertex_upstream(_fake_vertex_server):
    from apps.gateway.providers import vertex

    _fake_vertex_server.requests.clear()
    vertex.credentials_reset()
    yield _fake_vertex_server
    vertex.credentials_reset()
