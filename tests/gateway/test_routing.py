"""Routing through a live gateway with the OpenAI SDK: fallbacks, retries, cooldown shared by
instances, deployment quotas, strategies, regions and `auto`."""

import os
import subprocess
import sys
import time
from decimal import Decimal

import openai
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings as django_settings

from apps.analytics.models import UsageEvent
from apps.gateway import cooldown, router
from apps.gateway.models import Deployment
from tests import factories as f
from tests.conftest import GatewayThread

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def providers(upstream, anthropic_upstream):
    cred = f.ProviderCredentialFactory()
    return {
        "openai": f.ProviderFactory(name="up-openai", kind="openai_compatible", api_base=upstream.base_url,
                                    credential=cred),
        "anthropic": f.ProviderFactory(name="up-anthropic", kind="anthropic", api_base=anthropic_upstream.base_url,
                                       credential=cred),
        "dead": f.ProviderFactory(name="up-dead", kind="openai_compatible", api_base="http://127.0.0.1:9/v1",
                                  credential=cred),
        "mock": f.ProviderFactory(name="mock", kind="mock"),
    }


def alias_with(name, *deployments, price=("1", "2"), **alias_fields):
    """deployments: (provider, upstream_model, extra fields) tuples."""
    model_alias = f.ModelAliasFactory(alias=name, **alias_fields)
    for provider, model, extra in deployments:
        f.DeploymentFactory(alias=model_alias, provider=provider, upstream_model=model, **extra)
    if price:
        f.PriceFactory(model=name, input_usd_per_mtok=Decimal(price[0]), output_usd_per_mtok=Decimal(price[1]))
    return model_alias


def sdk(url, tenant=None, **key_fields):
    key = f.ApiKeyFactory(**({"tenant": tenant} if tenant else {}), **key_fields)
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key.secret, max_retries=0)


def used(upstream, prefix=""):
    return [r["body"]["model"] for r in upstream.requests if r["body"].get("model", "").startswith(prefix)]


# --- fallbacks and retries ---------------------------------------------------------------------


def test_dead_first_deployment_falls_over_with_no_client_visible_error(live_gateway, providers, upstream):
    alias_with("m", (providers["dead"], "unreachable", {"priority": 0}),
               (providers["openai"], "fail-503", {"priority": 1}),
               (providers["openai"], "good", {"priority": 2}))

    resp = sdk(live_gateway).chat.completions.with_raw_response.create(model="m", messages=MSG)

    assert resp.parse().choices[0].message.content == "Echo: hello"
    assert used(upstream) == ["fail-503", "fail-503", "good"]  # one retry, then the next deployment
    event = UsageEvent.objects.get(request_id=resp.headers["x-request-id"])
    assert (event.status, event.upstream_model) == (200, "good")


def test_stream_falls_over_before_the_first_byte(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "fail-500", {"priority": 0}), (providers["mock"], "mock-1", {"priority": 1}))

    chunks = list(sdk(live_gateway).chat.completions.create(model="m", messages=MSG, stream=True))

    assert "hello" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert UsageEvent.objects.get().upstream_model == "mock-1"


def test_retry_after_longer_than_a_fallback_moves_on_without_waiting(live_gateway, providers, anthropic_upstream):
    alias_with("m", (providers["anthropic"], "limited-30", {"priority": 0}), (providers["mock"], "m1", {"priority": 1}))

    sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert used(anthropic_upstream) == ["limited-30"]  # not retried: it asked for 30 s
    assert UsageEvent.objects.get().upstream_model == "m1"


def test_retry_after_zero_is_retried_on_the_same_deployment(live_gateway, providers, anthropic_upstream):
    alias_with("m", (providers["anthropic"], "fail-429", {"priority": 0}), (providers["mock"], "m1", {"priority": 1}))

    sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert used(anthropic_upstream) == ["fail-429", "fail-429"]


def test_attempts_are_bounded(live_gateway, providers, upstream, settings):
    settings.GATEWAY_MAX_ATTEMPTS = 3
    settings.GATEWAY_RETRIES_PER_DEPLOYMENT = 0
    alias_with("m", *[(providers["openai"], f"fail-502-{i}", {"priority": i}) for i in range(5)])

    with pytest.raises(openai.InternalServerError):
        sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert len(used(upstream, "fail-502")) == 3


def test_total_deadline_ends_the_request(live_gateway, providers, upstream, settings):
    settings.GATEWAY_TOTAL_DEADLINE_S = 0.3
    alias_with("m", (providers["openai"], "slow-3000", {}))

    with pytest.raises(openai.APIStatusError) as exc:
        sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert exc.value.status_code == 504
    assert exc.value.body["code"] == "upstream_deadline_exceeded"


def test_non_retryable_error_is_not_retried_nor_fallen_back(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "fail-400", {"priority": 0}), (providers["mock"], "m1", {"priority": 1}))

    with pytest.raises(openai.BadRequestError) as exc:
        sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert "fake upstream error 400" in exc.value.body["message"]
    assert used(upstream) == ["fail-400"]


# --- cooldown ----------------------------------------------------------------------------------


def test_two_gateway_instances_agree_on_a_cooldown(live_gateway, providers, upstream, settings):
    settings.GATEWAY_COOLDOWN_FAILURES = 2
    alias_with("m", (providers["openai"], "fail-503", {"priority": 0}), (providers["mock"], "m1", {"priority": 1}))
    dead = Deployment.objects.get(upstream_model="fail-503")
    second = GatewayThread().start()
    try:
        sdk(live_gateway).chat.completions.create(model="m", messages=MSG)  # two failures: cooldown
        assert used(upstream) == ["fail-503", "fail-503"]

        resp = sdk(second.url).chat.completions.with_raw_response.create(model="m", messages=MSG)
    finally:
        second.stop()

    assert used(upstream) == ["fail-503", "fail-503"]  # the other instance skipped it
    assert UsageEvent.objects.get(request_id=resp.headers["x-request-id"]).upstream_model == "m1"
    if django_settings.REDIS_URL:  # the state is in Redis, not in either instance's memory
        import redis

        assert redis.Redis.from_url(django_settings.REDIS_URL).pttl(f"llms:gw:{{d{dead.id}}}:cool") > 0
        assert not cooldown._local.until
    else:
        assert dead.id in cooldown._local.until


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="needs REDIS_URL")
def test_a_cooldown_set_by_another_process_is_honoured(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "first", {"priority": 0}), (providers["mock"], "m1", {"priority": 1}))
    first = Deployment.objects.get(upstream_model="first")
    code = ("import asyncio; from apps.gateway import cooldown; "
            f"print('cooled', asyncio.run(cooldown.failure_record({first.id})))")

    other = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=django_settings.BASE_DIR,
                           env={**os.environ, "GATEWAY_COOLDOWN_FAILURES": "1"}, capture_output=True, text=True,
                           timeout=120, check=True)
    sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert "cooled True" in other.stdout
    assert used(upstream) == []
    assert UsageEvent.objects.get().upstream_model == "m1"


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="needs REDIS_URL")
async def test_cooldown_is_shared_by_separate_redis_clients(settings):
    settings.GATEWAY_COOLDOWN_FAILURES = 2
    a = cooldown.RedisBackend()  # two instances' views: each keeps its own copy of what it read
    b = cooldown.RedisBackend()

    assert await a.failure_record(4242) is False
    assert await b.failure_record(4242) is True  # failures from two instances add up

    assert 4242 in await a.cooling([4242, 4243])
    assert set(await b.cooling([4242, 4243])) == {4242}


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="needs REDIS_URL")
async def test_concurrent_requests_share_one_cooldown_read(settings):
    import asyncio

    import redis

    settings.GATEWAY_COOLDOWN_CHECK_CACHE_S = 60
    reads = lambda: redis.Redis.from_url(settings.REDIS_URL).info("commandstats").get(  # noqa: E731
        "cmdstat_pttl", {}).get("calls", 0)
    backend = cooldown.RedisBackend()
    before = reads()

    answers = await asyncio.gather(*(backend.cooling([5151, 5152]) for _ in range(20)))

    assert answers == [{}] * 20
    assert reads() - before == 2  # one read of the two deployments, not twenty


async def test_redis_down_falls_back_to_in_process_state_quickly(settings):
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there
    settings.GATEWAY_COOLDOWN_FAILURES = 1
    started = time.monotonic()

    assert await cooldown.failure_record(77) is True
    assert 77 in await cooldown.cooling([77])
    assert time.monotonic() - started < 5


def test_every_deployment_cooling_is_a_503_with_retry_after(live_gateway, providers, upstream, settings):
    settings.GATEWAY_COOLDOWN_FAILURES = 2
    alias_with("m", (providers["openai"], "fail-503", {}))
    client = sdk(live_gateway)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=MSG)

    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="m", messages=MSG)

    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "deployments_cooling_down"
    assert int(exc.value.response.headers["retry-after"]) >= 1
    assert len(used(upstream)) == 2


# --- quotas and strategies ---------------------------------------------------------------------


def test_deployment_at_its_rpm_quota_is_skipped(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "limited", {"priority": 0, "rpm": 1}),
               (providers["mock"], "spill", {"priority": 1}))
    client = sdk(live_gateway)

    for _ in range(3):
        client.chat.completions.create(model="m", messages=MSG)

    assert used(upstream) == ["limited"]
    assert list(UsageEvent.objects.order_by("timestamp").values_list("upstream_model", flat=True)) == \
        ["limited", "spill", "spill"]


def test_deployment_at_its_tpm_quota_is_skipped(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "tpm-limited", {"priority": 0, "tpm": 60}),
               (providers["mock"], "spill", {"priority": 1}))
    client = sdk(live_gateway)

    client.chat.completions.create(model="m", messages=MSG, max_tokens=40)  # takes 48 (estimate), then 8 (actual)
    client.chat.completions.create(model="m", messages=MSG, max_tokens=40)  # 8 + 48 fits in 60
    client.chat.completions.create(model="m", messages=MSG, max_tokens=40)  # 16 + 48 would pass 60: skipped

    assert used(upstream) == ["tpm-limited", "tpm-limited"]


def test_every_deployment_at_quota_is_a_429(live_gateway, providers):
    alias_with("m", (providers["mock"], "only", {"rpm": 1}))
    client = sdk(live_gateway)
    client.chat.completions.create(model="m", messages=MSG)

    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="m", messages=MSG)

    assert exc.value.body["code"] == "deployments_at_quota"


def test_cheapest_strategy_picks_the_cheapest_deployment(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "pricey", {"input_usd_per_mtok": Decimal(5), "output_usd_per_mtok": 10}),
               (providers["openai"], "cheap", {"input_usd_per_mtok": Decimal("0.1"), "output_usd_per_mtok": 1}),
               strategy="cheapest")
    client = sdk(live_gateway)

    for _ in range(4):
        client.chat.completions.create(model="m", messages=MSG)

    assert used(upstream) == ["cheap"] * 4


def test_lowest_latency_strategy_prefers_the_fastest_measured(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "slowish", {}), (providers["openai"], "fast", {}),
               strategy="lowest_latency")
    slowish, fast = Deployment.objects.order_by("id")
    router.latency_observe(slowish.id, 0.9)
    router.latency_observe(fast.id, 0.01)

    for _ in range(3):
        sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert used(upstream) == ["fast"] * 3


def test_weighted_strategy_spreads_by_weight(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "heavy", {"weight": 1000}), (providers["openai"], "never", {"weight": 0}))

    for _ in range(3):
        sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert used(upstream) == ["heavy"] * 3


# --- regions -----------------------------------------------------------------------------------


def test_region_restricted_tenant_is_never_routed_outside_its_regions(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "us-model", {"region": "us-east", "priority": 0, "weight": 100}),
               (providers["openai"], "eu-model", {"region": "eu-west", "priority": 5}))
    eu = f.TenantFactory(allowed_regions=["eu-west", "eu-central"])
    client = sdk(live_gateway, tenant=eu)

    for _ in range(3):
        client.chat.completions.create(model="m", messages=MSG)
    sdk(live_gateway).chat.completions.create(model="m", messages=MSG)  # unrestricted tenant

    assert used(upstream) == ["eu-model"] * 3 + ["us-model"]


def test_region_restricted_tenant_gets_no_fallback_outside_its_regions(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "fail-503", {"region": "eu-west", "priority": 0}),
               (providers["openai"], "us-model", {"region": "us-east", "priority": 1}))
    client = sdk(live_gateway, tenant=f.TenantFactory(allowed_regions=["eu-west"]))

    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=MSG)

    assert "us-model" not in used(upstream)


def test_model_not_servable_in_region_is_a_clear_4xx(live_gateway, providers, upstream):
    alias_with("m", (providers["openai"], "us-model", {"region": "us-east"}))
    client = sdk(live_gateway, tenant=f.TenantFactory(allowed_regions=["eu-west"]))

    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.chat.completions.create(model="m", messages=MSG)

    assert exc.value.body["code"] == "region_not_allowed"
    assert "eu-west" in exc.value.body["message"]
    assert "us-east" in exc.value.body["message"]
    assert not upstream.requests
    assert UsageEvent.objects.get().status == 403


# --- auto --------------------------------------------------------------------------------------


@pytest.fixture
def catalogue(providers):
    alias_with("big", (providers["mock"], "big-up", {"region": "us-east"}), price=("10", "30"),
               context_window=200_000)
    alias_with("small", (providers["mock"], "small-up", {"region": "us-east"}), price=("0.1", "0.2"),
               context_window=50, supports_streaming=False)
    alias_with("mid", (providers["mock"], "mid-up", {"region": "eu-west"}), price=("1", "2"),
               context_window=128_000)
    alias_with("emb", (providers["mock"], "emb-up", {}), price=("0.02", "0"), supports_embeddings=True,
               supports_chat=False)


def test_auto_picks_the_cheapest_model_that_fits(live_gateway, catalogue):
    client = sdk(live_gateway)

    short = client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    long = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "word " * 400}])
    streamed = list(client.chat.completions.create(model="auto", messages=MSG, stream=True))
    emb = client.embeddings.create(model="auto", input="hello")

    assert short.headers["x-gateway-model"] == "small"
    assert long.headers["x-gateway-model"] == "mid"  # too long for small's 50-token window
    assert streamed
    assert emb.data
    models = list(UsageEvent.objects.order_by("timestamp").values_list("model", "upstream_model"))
    assert models == [("small", "small-up"), ("mid", "mid-up"), ("mid", "mid-up"), ("emb", "emb-up")]


def test_auto_respects_regions_and_skips_cooling_deployments(live_gateway, catalogue, settings):
    eu = sdk(live_gateway, tenant=f.TenantFactory(allowed_regions=["eu-west"]))
    eu.chat.completions.create(model="auto", messages=MSG)
    settings.GATEWAY_COOLDOWN_FAILURES = 1
    async_to_sync(cooldown.failure_record)(Deployment.objects.get(upstream_model="small-up").id)

    sdk(live_gateway).chat.completions.create(model="auto", messages=MSG)

    assert list(UsageEvent.objects.order_by("timestamp").values_list("model", flat=True)) == ["mid", "mid"]


def test_auto_with_nothing_that_fits_is_a_clear_400(live_gateway, catalogue):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(live_gateway).chat.completions.create(model="auto", messages=MSG, max_tokens=250_000)

    assert exc.value.body["code"] == "auto_no_model"
    assert "exceeds the context window of big, mid, small" in exc.value.body["message"]


def test_deployment_whose_last_probe_failed_is_tried_last(live_gateway, providers, upstream):
    from django.utils import timezone

    from apps.gateway.models import DeploymentHealth

    alias_with("m", (providers["openai"], "probed-down", {"weight": 1000}), (providers["openai"], "up", {"weight": 1}))
    DeploymentHealth.objects.create(deployment=Deployment.objects.get(upstream_model="probed-down"),
                                    checked_at=timezone.now(), ok=False, error="503")

    for _ in range(3):
        sdk(live_gateway).chat.completions.create(model="m", messages=MSG)

    assert used(upstream) == ["up"] * 3


def test_auto_outside_every_region_is_a_403_naming_the_restriction(live_gateway, catalogue):
    client = sdk(live_gateway, tenant=f.TenantFactory(allowed_regions=["ap-south"]))

    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.chat.completions.create(model="auto", messages=MSG)

    assert exc.value.body["code"] == "region_not_allowed"
    assert "ap-south" in exc.value.body["message"]
