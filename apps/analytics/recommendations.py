"""Cost optimisation recommendations: pure functions over ledger aggregates (no database here).

Three kinds, each a dollar figure over the last WINDOW_DAYS days with the arithmetic that gave it:

- `cheaper_model`: a source that sent short prompts (on average at most SHORT_PROMPT_TOKENS prompt
  tokens a request) to a model for which a cheaper alias of the same capabilities exists: what the
  same token counts would have cost on it, at its current price, against what the ledger says they
  cost. "Same capabilities" is what the gateway knows of an alias (`AliasInfo`): chat or embeddings,
  streaming, a context window and an output limit at least as large, and served by the same
  provider kind (the same vendor's family).
- `cache`: prompts sent again within the tenant's cache TTL while the response cache did not answer
  them: what the repeats cost. The repeats of each TTL-long window of time (UTC epoch seconds //
  TTL) after its most expensive request, which the cache would have stored: a lower bound, as a real
  cache answers at least those (an answer lives TTL seconds, so two misses are at least TTL apart),
  assuming every answer could be stored (tool calls and oversize answers are not).
- `batch`: synchronous, non-stream, uncached traffic not already in a batch, of at least
  BATCH_MIN_REQUESTS requests per source and model, on a provider with a batch API
  (BATCH_API_PROVIDER_KINDS): the model's batch discount of what it cost. An upper bound: it assumes
  every one of those requests could wait for a batch (up to 24 hours).

Another app supplies what analytics does not own, through the registries below: the gateway its
model aliases and providers (`alias_catalog_register`), billing the price of a token count on a
model (`price_quoter_register`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from apps.core.money import money_str

WINDOW_DAYS = 30
SHORT_PROMPT_TOKENS = 1000
MODEL_MIN_REQUESTS = 100
BATCH_MIN_REQUESTS = 1000
BATCH_API_PROVIDER_KINDS = frozenset({"openai", "anthropic"})
MIN_SAVING_USD = Decimal("0.01")
KINDS = ("cheaper_model", "cache", "batch")


@dataclass(frozen=True, slots=True)
class AliasInfo:
    """What the gateway knows an alias can do, and who serves it."""

    alias: str
    chat: bool
    embeddings: bool
    streaming: bool
    context_window: int
    max_output_tokens: int
    provider_kinds: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Catalog:
    aliases: dict[str, AliasInfo] = field(default_factory=dict)
    provider_kinds: dict[str, str] = field(default_factory=dict)  # provider name -> kind


@dataclass(frozen=True, slots=True)
class Quote:
    """What a token count costs on a model at its price in force (billing's computation)."""

    cost: Decimal
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    batch_discount: Decimal


# quote(model=, prompt_tokens=, completion_tokens=) -> Quote | None (None: the model is unpriced)
QuoteFn = Callable[..., Quote | None]

_catalog_sources: list[Callable[[], Catalog]] = []
_quoters: list[Callable[[datetime], QuoteFn]] = []


def alias_catalog_register(fn: Callable[[], Catalog]) -> None:
    """The gateway reports its model aliases and providers: `fn()` -> Catalog."""
    if fn not in _catalog_sources:
        _catalog_sources.append(fn)


def price_quoter_register(fn: Callable[[datetime], QuoteFn]) -> None:
    """Billing prices token counts: `fn(at)` -> a QuoteFn over the prices in force at `at`."""
    if fn not in _quoters:
        _quoters.append(fn)


def alias_catalog() -> Catalog:
    aliases, kinds = {}, {}
    for source in _catalog_sources:
        c = source()
        aliases.update(c.aliases)
        kinds.update(c.provider_kinds)
    return Catalog(aliases=aliases, provider_kinds=kinds)


def price_quoter(*, at: datetime) -> QuoteFn:
    quoters = [fn(at) for fn in _quoters]

    def quote(*, model: str, prompt_tokens: int, completion_tokens: int) -> Quote | None:
        for q in quoters:
            found = q(model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            if found is not None:
                return found
        return None
    return quote


@dataclass(slots=True)
class Recommendation:
    kind: str
    title: str
    saving_usd: Decimal
    current_cost_usd: Decimal
    alternative_cost_usd: Decimal
    arithmetic: str  # how the figure was computed, with the numbers
    assumption: str
    source_type: str = ""
    source_id: str = ""
    model: str = ""
    alternative: str = ""  # the cheaper alias, or "response cache", "batch API"
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    details: dict = field(default_factory=dict)


def _n(value: int) -> str:
    return f"{value:,}"


def _usd(value: Decimal) -> str:
    """Dollars in the arithmetic: to the micro-dollar, so the sums check ("$0.0114", "$1,234.50")."""
    amount = value.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP).normalize()
    places = max(2, -amount.as_tuple().exponent)
    return f"${amount:,.{places}f}"


def _rate(value: Decimal) -> str:
    return f"${format(value.normalize(), 'f')}/Mtok"


def capabilities_text(info: AliasInfo) -> str:
    parts = [p for p, on in (("chat", info.chat), ("embeddings", info.embeddings), ("streaming", info.streaming))
             if on]
    parts += [f"{_n(info.context_window)}-token context", f"{_n(info.max_output_tokens)} output tokens",
              "served by " + "/".join(sorted(info.provider_kinds))]
    return ", ".join(parts)


def equivalent(current: AliasInfo, other: AliasInfo) -> bool:
    """`other` can do what `current` does (see the module docstring)."""
    return (other.alias != current.alias and other.chat == current.chat and other.embeddings == current.embeddings
            and (other.streaming or not current.streaming) and other.context_window >= current.context_window
            and other.max_output_tokens >= current.max_output_tokens
            and bool(other.provider_kinds & current.provider_kinds))


def recommend_cheaper_model(rows, *, catalog: Catalog, quote: QuoteFn) -> list[Recommendation]:
    """`rows`: per (source_type, source_ref, model) the successful uncached requests of the window,
    their prompt and completion tokens and ledger cost."""
    out = []
    for r in rows:
        requests, prompt, completion, cost = r["requests"], r["prompt_tokens"] or 0, r["completion_tokens"] or 0, \
            r["cost"] or Decimal(0)
        current = catalog.aliases.get(r["model"])
        if current is None or requests < MODEL_MIN_REQUESTS or prompt > SHORT_PROMPT_TOKENS * requests:
            continue
        best: tuple[Quote, AliasInfo] | None = None
        for other in catalog.aliases.values():
            if not equivalent(current, other):
                continue
            q = quote(model=other.alias, prompt_tokens=prompt, completion_tokens=completion)
            if q is not None and (best is None or (q.cost, other.alias) < (best[0].cost, best[1].alias)):
                best = (q, other)
        if best is None or cost - best[0].cost < MIN_SAVING_USD:
            continue
        q, other = best
        saving = cost - q.cost
        average = round(prompt / requests)
        who = f"Source {r['source_ref'] or '(none)'} ({r['source_type']})"
        arithmetic = (
            f"{who} sent {_n(requests)} requests averaging {_n(average)} prompt tokens to {r['model']}: "
            f"{_n(prompt)} prompt and {_n(completion)} completion tokens that cost {_usd(cost)}. "
            f"On {other.alias} (same capabilities: {capabilities_text(other)}) the same tokens would have cost "
            f"{_n(prompt)} × {_rate(q.input_usd_per_mtok)} + {_n(completion)} × {_rate(q.output_usd_per_mtok)} "
            f"= {_usd(q.cost)} instead of {_usd(cost)}: "
            f"saving {_usd(saving)} = {_usd(cost)} − {_usd(q.cost)}.")
        out.append(Recommendation(
            kind="cheaper_model", title=f"Send {r['source_ref'] or '(none)'}'s short prompts to {other.alias} "
                                        f"instead of {r['model']}",
            saving_usd=saving, current_cost_usd=cost, alternative_cost_usd=q.cost, arithmetic=arithmetic,
            assumption=(f"Prompts average at most {_n(SHORT_PROMPT_TOKENS)} tokens; {other.alias} answers them as "
                        f"well and with as many tokens (tools and vision are not compared: check them); its current "
                        f"price; prompt-cache discounts ignored."),
            source_type=r["source_type"], source_id=r["source_ref"], model=r["model"], alternative=other.alias,
            requests=requests, prompt_tokens=prompt, completion_tokens=completion,
            details={"average_prompt_tokens": average, "capabilities": capabilities_text(other),
                     "input_usd_per_mtok": money_str(q.input_usd_per_mtok),
                     "output_usd_per_mtok": money_str(q.output_usd_per_mtok)}))
    return out


def recommend_cache(groups, *, ttl_s: int, cache_enabled: bool) -> list[Recommendation]:
    """`groups`: per (model, prompt hash, TTL window) with more than one request: `requests`,
    `spent` (their cost) and `max_cost`."""
    per_model: dict[str, dict] = {}
    for g in groups:
        acc = per_model.setdefault(g["model"], {"prompts": set(), "windows": 0, "requests": 0,
                                                "cost": Decimal(0), "kept": Decimal(0)})
        acc["prompts"].add(g["prompt_hash"])
        acc["windows"] += 1
        acc["requests"] += g["requests"]
        acc["cost"] += g["spent"] or Decimal(0)
        acc["kept"] += g["max_cost"] or Decimal(0)
    out = []
    for model, acc in sorted(per_model.items()):
        saving = acc["cost"] - acc["kept"]
        if saving < MIN_SAVING_USD:
            continue
        repeats = acc["requests"] - acc["windows"]
        how = ("the response cache is on for this tenant but did not answer them: send `cache: true` (or use "
               "temperature 0) on these requests" if cache_enabled else
               "with the response cache on (the tenant's `cache_enabled`, or `cache: true` on the request)")
        arithmetic = (
            f"{_n(len(acc['prompts']))} distinct prompts to {model} were sent more than once within "
            f"{_n(ttl_s)} s (the tenant's cache TTL): {_n(acc['requests'])} requests in {_n(acc['windows'])} "
            f"TTL windows cost {_usd(acc['cost'])}. The first answer of each window would have been "
            f"stored (counted at the most expensive request of the window, {_usd(acc['kept'])} in all) "
            f"and the {_n(repeats)} repeats replayed at $0: saving {_usd(saving)} = "
            f"{_usd(acc['cost'])} − {_usd(acc['kept'])}.")
        out.append(Recommendation(
            kind="cache", title=f"Cache repeated prompts to {model}", saving_usd=saving,
            current_cost_usd=acc["cost"], alternative_cost_usd=acc["kept"], arithmetic=arithmetic,
            assumption=(f"At least this much ({how}): repeats are counted within fixed {_n(ttl_s)}-second "
                        "windows; every answer storable (answers that call tools are not cached)."),
            model=model, alternative="response cache", requests=acc["requests"],
            details={"distinct_prompts": len(acc["prompts"]), "windows": acc["windows"], "repeats": repeats,
                     "ttl_s": ttl_s}))
    return out


def recommend_batch(rows, *, catalog: Catalog, quote: QuoteFn) -> list[Recommendation]:
    """`rows`: per (source_type, source_ref, model, provider) the successful, non-stream, uncached
    requests not in a batch: requests, tokens and ledger cost."""
    grouped: dict[tuple, dict] = {}
    for r in rows:
        kind = catalog.provider_kinds.get(r["provider"])
        if kind not in BATCH_API_PROVIDER_KINDS:
            continue
        acc = grouped.setdefault((r["source_type"], r["source_ref"], r["model"]),
                                 {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": Decimal(0),
                                  "kinds": set()})
        acc["requests"] += r["requests"]
        acc["prompt_tokens"] += r["prompt_tokens"] or 0
        acc["completion_tokens"] += r["completion_tokens"] or 0
        acc["cost"] += r["cost"] or Decimal(0)
        acc["kinds"].add(kind)
    out = []
    for (source_type, source_ref, model), acc in sorted(grouped.items()):
        if acc["requests"] < BATCH_MIN_REQUESTS:
            continue
        q = quote(model=model, prompt_tokens=acc["prompt_tokens"], completion_tokens=acc["completion_tokens"])
        if q is None or not q.batch_discount:
            continue
        saving = acc["cost"] * q.batch_discount
        if saving < MIN_SAVING_USD:
            continue
        share = f"{(q.batch_discount * 100).normalize():f}%"
        providers = "/".join(sorted(acc["kinds"]))
        arithmetic = (
            f"Source {source_ref or '(none)'} ({source_type}) sent {_n(acc['requests'])} synchronous, non-stream, "
            f"uncached requests to {model} ({providers}), which cost {_usd(acc['cost'])}. The provider's "
            f"batch API bills {share} less: saving up to {_usd(saving)} = {_usd(acc['cost'])} × "
            f"{q.batch_discount.normalize():f}.")
        out.append(Recommendation(
            kind="batch", title=f"Send {source_ref or '(none)'}'s non-urgent {model} traffic as a batch",
            saving_usd=saving, current_cost_usd=acc["cost"], alternative_cost_usd=acc["cost"] - saving,
            arithmetic=arithmetic,
            assumption="An upper bound: every one of these requests could wait for a batch (up to 24 hours).",
            source_type=source_type, source_id=source_ref, model=model, alternative="batch API",
            requests=acc["requests"], prompt_tokens=acc["prompt_tokens"], completion_tokens=acc["completion_tokens"],
            details={"batch_discount": money_str(q.batch_discount), "providers": sorted(acc["kinds"])}))
    return out


def ranked(recommendations: list[Recommendation]) -> list[Recommendation]:
    return sorted(recommendations, key=lambda r: (-r.saving_usd, r.kind, r.source_id, r.model))
