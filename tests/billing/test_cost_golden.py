"""Golden cost fixtures: a realistic usage payload of each provider kind, parsed under our usage
convention and costed by cost_compute, against exact Decimal values worked out by hand (and, for
the models genai-prices knows, against genai-prices' own calculator)."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from apps.billing.selectors import PriceInfo
from apps.billing.services import cost_compute
from apps.billing.usage import usage_from_provider

D = Decimal


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
LLAMA_VLLM = price("0.20", "0.20")
NO_CACHE_RATE = price("1", "2")

GOLDEN = [
    # (id, kind, price, usage payload as the provider sends it, batch, expected USD)
    pytest.param(
        "openai", GPT_4O,
        {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
         "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        False, D("0.005615"),  # 86*2.50 + 1920*1.25 + 300*10 = 5615 / 1e6
        id="openai-cached-prompt"),
    pytest.param(
        "openai", GPT_4O,
        {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
         "prompt_tokens_details": {"cached_tokens": 1920}},
        True, D("0.0028075"),  # the same request in a batch: half price
        id="openai-cached-prompt-batch"),
    pytest.param(
        "openai", O3_MINI,
        {"prompt_tokens": 1000, "completion_tokens": 2500, "total_tokens": 3500,
         "prompt_tokens_details": {"cached_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 2000}},
        False, D("0.0121"),  # reasoning is inside completion: 1000*1.10 + 2500*4.40 = 12100 / 1e6
        id="openai-reasoning"),
    pytest.param(
        "azure_openai", GPT_4O_MINI,
        {"prompt_tokens": 1536, "completion_tokens": 120, "total_tokens": 1656,
         "prompt_tokens_details": {"cached_tokens": 1024}},
        False, D("0.0002256"),  # 512*0.15 + 1024*0.075 + 120*0.60 = 225.6 / 1e6
        id="azure-cached-prompt"),
    pytest.param(
        "anthropic", SONNET_45,
        {"input_tokens": 21, "cache_creation_input_tokens": 188086, "cache_read_input_tokens": 0,
         "output_tokens": 393},
        False, D("0.7112805"),  # 21*3 + 188086*3.75 + 393*15 = 711280.5 / 1e6
        id="anthropic-cache-write"),
    pytest.param(
        "anthropic", SONNET_45,
        {"input_tokens": 50, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 188086,
         "output_tokens": 500},
        False, D("0.0640758"),  # 50*3 + 188086*0.30 + 500*15 = 64075.8 / 1e6
        id="anthropic-cache-read"),
    pytest.param(
        "anthropic", SONNET_45,
        {"input_tokens": 50, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 188086,
         "output_tokens": 500},
        True, D("0.0320379"),
        id="anthropic-cache-read-batch"),
    pytest.param(
        "gemini", GEMINI_25_FLASH,
        {"promptTokenCount": 12000, "candidatesTokenCount": 800, "thoughtsTokenCount": 1200,
         "cachedContentTokenCount": 10000, "totalTokenCount": 14000},
        False, D("0.0059"),  # 2000*0.30 + 10000*0.03 + (800+1200)*2.50 = 5900 / 1e6
        id="gemini-cached-content-and-thoughts"),
    pytest.param(
        "gemini", GEMINI_25_FLASH,
        {"promptTokenCount": 12000, "candidatesTokenCount": 800, "thoughtsTokenCount": 1200,
         "cachedContentTokenCount": 10000, "totalTokenCount": 14000},
        True, D("0.0059"),  # no batch discount configured for this price: full price
        id="gemini-batch-without-discount"),
    pytest.param(
        "openai_compatible", DEEPSEEK_CHAT,
        {"prompt_tokens": 1200, "completion_tokens": 350, "total_tokens": 1550,
         "prompt_cache_hit_tokens": 1000, "prompt_cache_miss_tokens": 200},
        False, D("0.000509"),  # 200*0.27 + 1000*0.07 + 350*1.10 = 509 / 1e6
        id="openai-compatible-deepseek-cache-hit"),
    pytest.param(
        "openai_compatible", LLAMA_VLLM,
        {"prompt_tokens": 57, "completion_tokens": 17, "total_tokens": 74},
        False, D("0.0000148"),
        id="openai-compatible-vllm"),
    pytest.param(
        "openai_compatible", NO_CACHE_RATE,
        {"prompt_tokens": 200, "completion_tokens": 10, "prompt_tokens_details": {"cached_tokens": 100}},
        False, D("0.00022"),  # no cached rate: cached tokens cost plain input, never $0
        id="cached-without-cached-rate"),
    pytest.param(
        "mock", GPT_4O_MINI,
        {"prompt_tokens": 14, "completion_tokens": 13, "total_tokens": 27},
        False, D("0.0000099"),
        id="mock"),
    pytest.param(
        "mock", GPT_4O_MINI,
        {"prompt_tokens": 14, "completion_tokens": 13, "total_tokens": 27},
        True, D("0.00000495"),
        id="mock-batch"),
]


@pytest.mark.parametrize(("kind", "price_info", "payload", "batch", "expected"), GOLDEN)
def test_golden_cost(kind, price_info, payload, batch, expected):
    usage = usage_from_provider(kind=kind, data=payload)

    cost = cost_compute(price=price_info, prompt_tokens=usage.prompt_tokens,
                        completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_tokens,
                        cache_write_tokens=usage.cache_write_tokens, batch=batch)

    assert cost == expected
    assert isinstance(cost, Decimal)


def test_anthropic_prompt_counts_cache_reads_and_writes_once():
    usage = usage_from_provider(kind="anthropic", data={"input_tokens": 10, "cache_creation_input_tokens": 20,
                                                        "cache_read_input_tokens": 30, "output_tokens": 5})

    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (60, 30, 20)


def test_gemini_thoughts_are_output_and_reasoning():
    usage = usage_from_provider(kind="gemini", data={"promptTokenCount": 7, "candidatesTokenCount": 3,
                                                     "thoughtsTokenCount": 11})

    assert (usage.completion_tokens, usage.reasoning_tokens) == (14, 11)


def test_no_usage_payload_gives_none():
    assert usage_from_provider(kind="anthropic", data=None) is None


def test_cost_below_the_quantum_rounds_half_up():
    tiny = price("0.000033", "0")

    assert cost_compute(price=tiny, prompt_tokens=3, completion_tokens=0) == D("0.0000000001")
    assert cost_compute(price=tiny, prompt_tokens=1, completion_tokens=0) == D("0")


def test_openai_usage_parsing_agrees_with_the_gateway_usage():
    from apps.gateway.providers.base import Usage

    payload = {"prompt_tokens": 2006, "completion_tokens": 300, "prompt_tokens_details": {"cached_tokens": 1920},
               "completion_tokens_details": {"reasoning_tokens": 7}}

    assert usage_from_provider(kind="openai", data=payload) == Usage.from_openai(payload)


@pytest.mark.parametrize(("model", "provider_id", "tokens"), [
    ("gpt-4o", "openai", {"input_tokens": 2006, "cache_read_tokens": 1920, "output_tokens": 300}),
    ("claude-sonnet-4-5", "anthropic", {"input_tokens": 188107, "cache_write_tokens": 188086, "output_tokens": 393}),
    ("claude-3-5-haiku-latest", "anthropic", {"input_tokens": 5000, "cache_read_tokens": 4000, "output_tokens": 80}),
    ("gemini-2.5-flash", "google", {"input_tokens": 12000, "cache_read_tokens": 10000, "output_tokens": 2000}),
])
def test_cost_matches_genai_prices_for_the_prices_it_seeds(model, provider_id, tokens):
    """The price table is seeded from genai-prices; our formula must give its answer."""
    import genai_prices

    from apps.billing.genai import genai_price_lookup

    at = datetime(2026, 11, 1, tzinfo=UTC)
    found = genai_price_lookup(refs=[(model, {"google": "gemini"}.get(provider_id, provider_id))], at=at)
    info = PriceInfo(id=1, model=model, input_usd_per_mtok=found.input_usd_per_mtok,
                     output_usd_per_mtok=found.output_usd_per_mtok,
                     cached_input_usd_per_mtok=found.cached_input_usd_per_mtok,
                     cache_write_usd_per_mtok=found.cache_write_usd_per_mtok, batch_discount=found.batch_discount,
                     effective_from=at)

    ours = cost_compute(price=info, prompt_tokens=tokens["input_tokens"], completion_tokens=tokens["output_tokens"],
                        cached_tokens=tokens.get("cache_read_tokens", 0),
                        cache_write_tokens=tokens.get("cache_write_tokens", 0))
    theirs = genai_prices.calc_price(genai_prices.Usage(**tokens), model, provider_id=provider_id,
                                     genai_request_timestamp=at).total_price

    assert ours == theirs
