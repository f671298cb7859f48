"""Golden cost fixtures, through the path production takes: a fake upstream on loopback sends a
provider's real usage object, in its response body and at its place in the SSE stream; the
adapter's complete() or stream() parses it (each adapter owns its parser); cost_compute prices
the resulting Usage. Expected values are exact Decimals worked out by hand and, for the models
genai-prices knows, checked against genai-prices' own extraction and calculator on the same body.
Streaming and not must give the same Usage, hence the same cost."""

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from apps.billing.selectors import PriceInfo
from apps.billing.services import cost_compute
from apps.gateway.providers import GATEWAY_USAGE, Target, Usage, adapter_for

D = Decimal

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "What does a cached token cost?"}],
        "max_tokens": 64}


def body(target: Target) -> dict:
    """The body the pipeline gives an adapter: OpenAI-shaped, `model` set to the upstream model."""
    return {**CHAT, "model": target.upstream_model}


def price(inp, out, cached=None, write=None, batch="0") -> PriceInfo:
    return PriceInfo(id=1, model="m", input_usd_per_mtok=D(inp), output_usd_per_mtok=D(out),
                     cached_input_usd_per_mtok=D(cached) if cached else None,
                     cache_write_usd_per_mtok=D(write) if write else None, batch_discount=D(batch),
                     effective_from=datetime(2025, 1, 1, tzinfo=UTC))


GPT_4O = price("2.50", "10.00", cached="1.25", batch="0.5")
O3_MINI = price("1.10", "4.40", cached="0.55", batch="0.5")
GPT_4O_MINI = price("0.15", "0.60", cached="0.075", batch="0.5")
SONNET_45 = price("3", "15", cached="0.30", write="3.75", batch="0.5")
GEMINI_25_FLASH = price("0.30", "2.50", cached="0.03")
DEEPSEEK_CHAT = price("0.27", "1.10", cached="0.07")
DEEPSEEK_REASONER = price("0.55", "2.19", cached="0.14")
LLAMA_VLLM = price("0.20", "0.20")
NO_CACHE_RATE = price("1", "2")


@dataclass(frozen=True)
class Golden:
    kind: str
    price: PriceInfo
    usage: dict  # as the provider sends it
    tokens: tuple  # our Usage: (prompt, completion, cached, cache write, reasoning)
    cost: Decimal
    how: dict | None = None  # where the fake puts usage in a stream (see tests/fakes)
    genai: tuple | None = None  # (model, genai-prices provider id, api flavor) to cross-check


OPENAI_CHAT = "chat"
GOLDEN = {
    "openai-cached-prompt": Golden(
        "openai", GPT_4O,
        {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
         "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                       "rejected_prediction_tokens": 0}},
        (2006, 300, 1920, 0, 0), D("0.005615"),  # 86*2.50 + 1920*1.25 + 300*10 = 5615 / 1e6
        genai=("gpt-4o", "openai", OPENAI_CHAT)),
    "openai-reasoning": Golden(
        "openai", O3_MINI,
        {"prompt_tokens": 1000, "completion_tokens": 2500, "total_tokens": 3500,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 2000, "audio_tokens": 0}},
        (1000, 2500, 0, 0, 2000), D("0.0121"),  # reasoning is inside completion: 1000*1.10 + 2500*4.40
        genai=("o3-mini", "openai", OPENAI_CHAT)),
    "openai-cached-and-reasoning": Golden(
        "openai", O3_MINI,
        {"prompt_tokens": 5000, "completion_tokens": 1800, "total_tokens": 6800,
         "prompt_tokens_details": {"cached_tokens": 4096, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 1536, "audio_tokens": 0}},
        (5000, 1800, 4096, 0, 1536), D("0.0111672"),  # 904*1.10 + 4096*0.55 + 1800*4.40 = 11167.2 / 1e6
        genai=("o3-mini", "openai", OPENAI_CHAT)),
    "azure-cached-prompt": Golden(
        "azure_openai", GPT_4O_MINI,
        {"prompt_tokens": 1536, "completion_tokens": 120, "total_tokens": 1656,
         "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        (1536, 120, 1024, 0, 0), D("0.0002256"),  # 512*0.15 + 1024*0.075 + 120*0.60 = 225.6 / 1e6
        genai=("gpt-4o-mini", "azure", OPENAI_CHAT)),
    "anthropic-cache-write": Golden(
        "anthropic", SONNET_45,
        {"input_tokens": 21, "cache_creation_input_tokens": 188086, "cache_read_input_tokens": 0,
         "output_tokens": 393, "service_tier": "standard"},
        (188107, 393, 0, 188086, 0), D("0.7112805"),  # 21*3 + 188086*3.75 + 393*15 = 711280.5 / 1e6
        genai=("claude-sonnet-4-5", "anthropic", "default")),
    "anthropic-cache-read": Golden(
        "anthropic", SONNET_45,
        {"input_tokens": 50, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 188086,
         "output_tokens": 500, "service_tier": "standard"},
        (188136, 500, 188086, 0, 0), D("0.0640758"),  # 50*3 + 188086*0.30 + 500*15 = 64075.8 / 1e6
        genai=("claude-sonnet-4-5", "anthropic", "default")),
    "anthropic-cache-read-and-write-full-delta": Golden(
        "anthropic", SONNET_45,
        {"input_tokens": 12, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 3000,
         "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
         "output_tokens": 250, "service_tier": "standard"},
        (4512, 250, 3000, 1500, 0), D("0.010311"),  # 12*3 + 1500*3.75 + 3000*0.30 + 250*15 = 10311 / 1e6
        how={"delta": "full"},
        genai=("claude-sonnet-4-5", "anthropic", "default")),
    "gemini-cached-content-and-thoughts": Golden(
        "gemini", GEMINI_25_FLASH,
        {"promptTokenCount": 12000, "candidatesTokenCount": 800, "thoughtsTokenCount": 1200,
         "cachedContentTokenCount": 10000, "totalTokenCount": 14000,
         "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12000}],
         "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 10000}]},
        (12000, 2000, 10000, 0, 1200), D("0.0059"),  # 2000*0.30 + 10000*0.03 + (800+1200)*2.50 = 5900 / 1e6
        genai=("gemini-2.5-flash", "google", "default")),
    "gemini-tool-use-prompt": Golden(
        "gemini", GEMINI_25_FLASH,
        {"promptTokenCount": 400, "candidatesTokenCount": 50, "toolUsePromptTokenCount": 100,
         "totalTokenCount": 550},
        (500, 50, 0, 0, 0), D("0.000275"),  # (400+100)*0.30 + 50*2.50 = 275 / 1e6
        genai=("gemini-2.5-flash", "google", "default")),
    "deepseek-cache-hit": Golden(  # DeepSeek's own fields only, usage on the finish chunk
        "openai_compatible", DEEPSEEK_CHAT,
        {"prompt_tokens": 1200, "completion_tokens": 350, "total_tokens": 1550,
         "prompt_cache_hit_tokens": 1000, "prompt_cache_miss_tokens": 200},
        (1200, 350, 1000, 0, 0), D("0.000509"),  # 200*0.27 + 1000*0.07 + 350*1.10 = 509 / 1e6
        how={"on_finish_chunk": True}),
    "deepseek-reasoner-both-cache-fields": Golden(  # newer DeepSeek bodies name the hit twice: count it once
        "openai_compatible", DEEPSEEK_REASONER,
        {"prompt_tokens": 1300, "completion_tokens": 900, "total_tokens": 2200,
         "prompt_tokens_details": {"cached_tokens": 1152}, "completion_tokens_details": {"reasoning_tokens": 700},
         "prompt_cache_hit_tokens": 1152, "prompt_cache_miss_tokens": 148},
        (1300, 900, 1152, 0, 700), D("0.00221368"),  # 148*0.55 + 1152*0.14 + 900*2.19 = 2213.68 / 1e6
        how={"on_finish_chunk": True},
        genai=("deepseek-reasoner", "deepseek", OPENAI_CHAT)),
    "openai-compatible-vllm": Golden(
        "openai_compatible", LLAMA_VLLM,
        {"prompt_tokens": 57, "completion_tokens": 17, "total_tokens": 74},
        (57, 17, 0, 0, 0), D("0.0000148")),
    "cached-without-cached-rate": Golden(
        "openai_compatible", NO_CACHE_RATE,
        {"prompt_tokens": 200, "completion_tokens": 10, "total_tokens": 210,
         "prompt_tokens_details": {"cached_tokens": 100}},
        (200, 10, 100, 0, 0), D("0.00022")),  # no cached rate: cached tokens cost plain input, never $0
}

SERVERS = {"openai": "upstream", "openai_compatible": "upstream", "azure_openai": "azure_upstream",
           "anthropic": "anthropic_upstream", "gemini": "gemini_upstream"}


def cost_of(info: PriceInfo, usage: Usage) -> Decimal:
    """What the pipeline charges for a Usage: every count at its own rate, batch price only when
    the provider billed one."""
    return cost_compute(price=info, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                        cached_tokens=usage.cached_tokens, cache_write_tokens=usage.cache_write_tokens,
                        batch=usage.batch_priced)


def tokens(usage: Usage) -> tuple:
    return (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens,
            usage.reasoning_tokens)


@pytest.fixture
def scripted(request):
    """`scripted(name)`: the fake upstream of that golden fixture's kind, told to report its usage;
    returns the Target to call it with."""
    used = []

    def make(name: str) -> Target:
        golden = GOLDEN[name]
        server = request.getfixturevalue(SERVERS[golden.kind])
        model = server.script_usage(f"golden-{name}", golden.usage, **(golden.how or {}))
        used.append((server, model))
        return Target(kind=golden.kind, api_base=server.base_url, upstream_model=model, secret="sk-golden")

    yield make
    for server, model in used:
        server.scripts.pop(model, None)


async def streamed(target: Target) -> tuple[list[dict], Usage | None]:
    """The chunks of a stream and the Usage billing gets from it (the last GATEWAY_USAGE)."""
    chunks = [c async for c in adapter_for(target.kind).stream(target, body(target))]
    parsed = [c[GATEWAY_USAGE] for c in chunks if GATEWAY_USAGE in c]
    return chunks, parsed[-1] if parsed else None


@pytest.mark.parametrize("name", GOLDEN)
async def test_golden_cost_without_streaming(scripted, name):
    golden = GOLDEN[name]

    target = scripted(name)
    completion = await adapter_for(golden.kind).complete(target, body(target))

    assert tokens(completion.usage) == golden.tokens
    assert cost_of(golden.price, completion.usage) == golden.cost
    # What the client reads as usage (OpenAI's shape) says the same.
    assert Usage.from_openai(completion.body["usage"]) == completion.usage


@pytest.mark.parametrize("name", GOLDEN)
async def test_golden_cost_streaming_equals_non_streaming(scripted, name):
    golden = GOLDEN[name]
    target = scripted(name)

    chunks, usage = await streamed(target)
    completion = await adapter_for(golden.kind).complete(target, body(target))

    assert usage == completion.usage
    assert cost_of(golden.price, usage) == golden.cost
    carrying = [c for c in chunks if c.get("usage")]
    assert carrying, "a stream whose provider reported usage must carry it"
    assert all(isinstance(c[GATEWAY_USAGE], Usage) for c in carrying)
    assert [c for c in chunks if GATEWAY_USAGE in c] == carrying  # only chunks with usage have it
    assert Usage.from_openai(carrying[-1]["usage"]) == usage  # the client's OpenAI-shaped copy agrees


async def test_deepseek_cache_hits_reach_the_client_in_openai_shape_too(scripted):
    chunks, _ = await streamed(scripted("deepseek-cache-hit"))

    relayed = [c["usage"] for c in chunks if c.get("usage")][-1]
    assert relayed["prompt_tokens_details"] == {"cached_tokens": 1000}
    assert (relayed["prompt_cache_hit_tokens"], relayed["prompt_cache_miss_tokens"]) == (1000, 200)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # DeepSeek's usage rides the finish chunk


async def test_anthropic_stream_merges_message_start_and_message_delta_usage(scripted):
    """message_start has the input side and output_tokens 1; message_delta the final output_tokens."""
    _, usage = await streamed(scripted("anthropic-cache-write"))

    assert tokens(usage) == (21 + 188086, 393, 0, 188086, 0)


async def test_mock_usage_is_the_same_streaming_or_not_and_carried_for_billing():
    target = Target(kind="mock", api_base="", upstream_model="mock-golden")

    completion = await adapter_for("mock").complete(target, body(target))
    chunks, usage = await streamed(target)

    assert usage == completion.usage
    assert tokens(usage) == (20, 15, 0, 0, 0)
    assert cost_of(GPT_4O_MINI, usage) == D("0.000012")  # 20*0.15 + 15*0.60 = 12 / 1e6
    assert [c for c in chunks if GATEWAY_USAGE in c] == [c for c in chunks if c.get("usage")] == chunks[-1:]


async def test_no_usage_from_the_provider_is_estimated_never_free(upstream):
    target = Target(kind="openai_compatible", api_base=upstream.base_url, upstream_model="nousage-golden")

    completion = await adapter_for("openai_compatible").complete(target, body(target))
    chunks, usage = await streamed(target)

    assert completion.usage.estimated  # the pipeline counts it then
    assert usage is None
    assert not any(GATEWAY_USAGE in c for c in chunks)


@pytest.mark.parametrize(("name", "expected"), [
    ("openai-cached-prompt", D("0.0028075")),  # half price
    ("anthropic-cache-read", D("0.0320379")),
    ("gemini-cached-content-and-thoughts", D("0.0059")),  # no batch discount in this price: full price
])
async def test_batch_price_applies_only_when_the_provider_billed_one(scripted, name, expected):
    golden = GOLDEN[name]
    target = scripted(name)
    completion = await adapter_for(golden.kind).complete(target, body(target))

    assert completion.usage.batch_priced is False  # a call is batch priced only as a provider batch API's result
    assert cost_of(golden.price, completion.usage) == golden.cost
    assert cost_of(golden.price, replace(completion.usage, batch_priced=True)) == expected


@pytest.mark.parametrize(("kind", "expected"), [
    ("openai", D("0.000002")),  # OpenAI Batch API: half
    ("anthropic", D("0.000002")),  # Anthropic Message Batches: half
    ("gemini", D("0.000004")),  # no documented batch discount here: the full price
])
def test_a_batch_priced_call_without_a_batch_discount_in_its_price_takes_the_providers(kind, expected):
    plain = price("1", "1")  # e.g. a price from the config file that names no batch_discount

    assert cost_compute(price=plain, prompt_tokens=2, completion_tokens=2, batch=True, provider_kind=kind) == expected
    assert cost_compute(price=plain, prompt_tokens=2, completion_tokens=2, provider_kind=kind) == D("0.000004")
    own = price("1", "1", batch="0.25")  # the price's own batch discount wins
    cost = cost_compute(price=own, prompt_tokens=2, completion_tokens=2, batch=True, provider_kind=kind)
    assert cost == D("0.000003")


def test_cost_below_the_quantum_rounds_half_up():
    tiny = price("0.000033", "0")

    assert cost_compute(price=tiny, prompt_tokens=3, completion_tokens=0) == D("0.0000000001")
    assert cost_compute(price=tiny, prompt_tokens=1, completion_tokens=0) == D("0")


# Midnight UTC: where genai-prices has time-of-day prices (DeepSeek), its unconditional price,
# the one the price table is seeded with, is in force then.
AT = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.mark.parametrize("name", [name for name, golden in GOLDEN.items() if golden.genai])
async def test_adapter_cost_matches_genai_prices_on_the_same_body(scripted, name):
    """The price table is seeded from genai-prices: with its prices, the adapter's parse and our
    formula must give the cost genai-prices computes from the same provider body."""
    import genai_prices

    from apps.billing.genai import genai_price_lookup

    golden = GOLDEN[name]
    model, provider_id, flavor = golden.genai
    found = genai_price_lookup(refs=[(model, golden.kind)], at=AT)
    info = PriceInfo(id=1, model=model, input_usd_per_mtok=found.input_usd_per_mtok,
                     output_usd_per_mtok=found.output_usd_per_mtok,
                     cached_input_usd_per_mtok=found.cached_input_usd_per_mtok,
                     cache_write_usd_per_mtok=found.cache_write_usd_per_mtok, batch_discount=found.batch_discount,
                     effective_from=AT)
    sent = {"modelVersion": model, "usageMetadata": golden.usage} if golden.kind == "gemini" \
        else {"model": model, "usage": golden.usage}

    target = scripted(name)
    completion = await adapter_for(golden.kind).complete(target, body(target))
    theirs = genai_prices.extract_usage(sent, provider_id=provider_id, api_flavor=flavor) \
        .calc_price(genai_request_timestamp=AT).total_price

    assert cost_of(info, completion.usage) == theirs
