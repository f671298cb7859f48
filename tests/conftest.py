"""Shared fixtures: a fake OpenAI-compatible upstream, a live gateway (uvicorn, ASGI) in a thread,
and a tenant with a key and a model routed to the fake upstream.

Against PostgreSQL and Redis when DATABASE_URL / REDIS_URL are set (CI), SQLite otherwise.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

import pytest
from django.conf import settings

from apps.billing import alerts
from apps.gateway import pipeline, selectors
from tests import factories as f
from tests.fakes.openai_server import FakeOpenAI


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """In-process caches must not carry one test's keys or routes into the next."""
    pipeline._auth_cache.clear()
    selectors.routing_table_invalidate()
    alerts.alerts_state_reset()
    if settings.REDIS_URL:
        import redis

        redis.Redis.from_url(settings.REDIS_URL).flushdb()
    yield
    pipeline._auth_cache.clear()
    selectors.routing_table_invalidate()


@pytest.fixture(scope="session")
def fake_openai_server():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def upstream(fake_openai_server):
    fake_openai_server.requests.clear()
    return fake_openai_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayThread:
    """The real ASGI app under uvicorn, in a thread of the test process."""

    def __init__(self):
        import uvicorn

        from config.asgi import application

        self.port = _free_port()
        config = uvicorn.Config(application, host="127.0.0.1", port=self.port, log_level="warning",
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
