"""Writes and computations of money. Decimal throughout; never float."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from apps.analytics.recommendations import Quote, QuoteFn

from .selectors import PriceInfo, price_in_force, price_versions_by_model

MTOK = Decimal(1_000_000)
QUANT = Decimal("0.0000000001")

# What a provider's own batch API takes off its sync price, when the price in force names no
# batch discount of its own (a price from the config file or the admin without `batch_discount`,
# or a model genai-prices has no batch price for). Both providers document half price:
# OpenAI Batch API and Anthropic Message Batches, "50% of standard prices", input and output.
PROVIDER_BATCH_DISCOUNT: dict[str, Decimal] = {"openai": Decimal("0.5"), "anthropic": Decimal("0.5")}


def batch_discount_of(*, price: PriceInfo, provider_kind: str = "") -> Decimal:
    """The share taken off a call the provider billed at its batch price: the price's own
    `batch_discount`, else the provider's documented one (PROVIDER_BATCH_DISCOUNT), else none."""
    return price.batch_discount or PROVIDER_BATCH_DISCOUNT.get(provider_kind, Decimal(0))


def cost_compute(*, price: PriceInfo, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                 cache_write_tokens: int = 0, batch: bool = False, provider_kind: str = "") -> Decimal:
    """USD cost of one request. Cached reads and cache writes are billed at their own rates where
    the price has them (else as plain input); reasoning tokens are part of completion tokens.
    `batch`: the provider billed it at its batch price (`batch_discount_of`)."""
    cached_rate = price.cached_input_usd_per_mtok if price.cached_input_usd_per_mtok is not None \
        else price.input_usd_per_mtok
    write_rate = price.cache_write_usd_per_mtok if price.cache_write_usd_per_mtok is not None \
        else price.input_usd_per_mtok
    plain_input = max(0, prompt_tokens - cached_tokens - cache_write_tokens)
    total = (
        plain_input * price.input_usd_per_mtok
        + cached_tokens * cached_rate
        + cache_write_tokens * write_rate
        + completion_tokens * price.output_usd_per_mtok
    ) / MTOK
    if batch:
        total *= Decimal(1) - batch_discount_of(price=price, provider_kind=provider_kind)
    return total.quantize(QUANT, rounding=ROUND_HALF_UP)


def price_quoter(at: datetime) -> QuoteFn:
    """What a token count costs on a model alias at its price in force at `at` (None: unpriced),
    with the rates and batch discount used; prices read once (the cost recommendations ask for many)."""
    versions = price_versions_by_model()

    def quote(*, model: str, prompt_tokens: int, completion_tokens: int) -> Quote | None:
        price = price_in_force(versions.get(model), at)
        if price is None:
            return None
        return Quote(cost=cost_compute(price=price, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
                     input_usd_per_mtok=price.input_usd_per_mtok, output_usd_per_mtok=price.output_usd_per_mtok,
                     batch_discount=price.batch_discount)
    return quote


def cost_upper_bound(*, price: PriceInfo, prompt_tokens_max: int, completion_tokens_max: int) -> Decimal:
    """The most a request can cost: what admission holds against budgets."""
    input_rate = max(price.input_usd_per_mtok, price.cache_write_usd_per_mtok or Decimal(0))
    total = (prompt_tokens_max * input_rate + completion_tokens_max * price.output_usd_per_mtok) / MTOK
    return total.quantize(QUANT, rounding=ROUND_HALF_UP)


def price_set(*, model: str, input_usd_per_mtok: Decimal, output_usd_per_mtok: Decimal, actor: str,
              cached_input_usd_per_mtok: Decimal | None = None, cache_write_usd_per_mtok: Decimal | None = None,
              batch_discount: Decimal = Decimal(0), effective_from=None, source: str = "config",
              source_ref: str = ""):
    """Add a price version when it differs from the one in force. Prices are never edited in place."""
    from django.utils import timezone

    from apps.keys.services import audit_record, snapshot

    from .models import Price
    from .selectors import price_for_model

    when = effective_from or timezone.now()
    current = price_for_model(model=model, at=when)
    wanted = (input_usd_per_mtok, output_usd_per_mtok, cached_input_usd_per_mtok, cache_write_usd_per_mtok,
              batch_discount)
    if current is not None and (current.input_usd_per_mtok, current.output_usd_per_mtok,
                                current.cached_input_usd_per_mtok, current.cache_write_usd_per_mtok,
                                current.batch_discount) == wanted:
        return None
    price = Price.objects.create(
        model=model, input_usd_per_mtok=input_usd_per_mtok, output_usd_per_mtok=output_usd_per_mtok,
        cached_input_usd_per_mtok=cached_input_usd_per_mtok, cache_write_usd_per_mtok=cache_write_usd_per_mtok,
        batch_discount=batch_discount, effective_from=when, source=source, source_ref=source_ref,
    )
    audit_record(actor=actor, action="create", obj=price, after=snapshot(price))
    return price


def budget_upsert(*, tenant, name: str, actor: str, **values):
    from apps.keys.services import audited_upsert

    from .models import Budget

    budget, _ = audited_upsert(Budget, actor=actor, lookup={"tenant": tenant, "name": name}, values=values,
                               tenant=tenant)
    return budget


def price_version_create(*, model: str, input_usd_per_mtok: Decimal, output_usd_per_mtok: Decimal, actor: str,
                         effective_from, cached_input_usd_per_mtok: Decimal | None = None,
                         cache_write_usd_per_mtok: Decimal | None = None, batch_discount: Decimal = Decimal(0),
                         source: str = "admin", source_ref: str = ""):
    """Add a price version as given (the admin's "change"): the versions before it stay untouched."""
    from django.core.exceptions import ValidationError

    from apps.keys.services import audit_record, snapshot

    from .models import Price

    if Price.objects.filter(model=model, effective_from=effective_from).exists():
        raise ValidationError(f"{model} already has a price version effective from {effective_from.isoformat()}; "
                              "choose another effective_from.")
    price = Price.objects.create(
        model=model, input_usd_per_mtok=input_usd_per_mtok, output_usd_per_mtok=output_usd_per_mtok,
        cached_input_usd_per_mtok=cached_input_usd_per_mtok, cache_write_usd_per_mtok=cache_write_usd_per_mtok,
        batch_discount=batch_discount or Decimal(0), effective_from=effective_from, source=source,
        source_ref=source_ref,
    )
    audit_record(actor=actor, action="create", obj=price, after=snapshot(price))
    return price


OVERRIDE_SOURCES = ("config", "admin")


def prices_sync(*, aliases: dict[str, list[tuple[str, str | None]]], actor: str = "cli", at=None) -> dict[str, str]:
    """Seed and refresh prices from the installed genai-prices package (offline).

    `aliases`: alias -> the (model name, provider kind) references to look up, in order (the
    gateway gives its deployments' upstream models in routing order, then the alias itself); the
    first match is taken. A new version is added only
    when the numbers changed. An alias whose price in force comes from the config file or the
    admin is an override and is left alone. Returns alias -> "created" | "unchanged" |
    "override" | "unknown"."""
    from django.db import transaction
    from django.utils import timezone

    from apps.core import caches

    from .genai import genai_price_lookup
    from .selectors import price_in_force, price_versions_by_model

    when = at or timezone.now()
    versions = price_versions_by_model()
    out: dict[str, str] = {}
    with transaction.atomic():
        for alias, refs in sorted(aliases.items()):
            current = price_in_force(versions.get(alias), when)
            if current is not None and current.source in OVERRIDE_SOURCES:
                out[alias] = "override"
                continue
            found = genai_price_lookup(refs=refs, at=when)
            if found is None:
                out[alias] = "unknown"
                continue
            created = price_set(
                model=alias, input_usd_per_mtok=found.input_usd_per_mtok,
                output_usd_per_mtok=found.output_usd_per_mtok,
                cached_input_usd_per_mtok=found.cached_input_usd_per_mtok,
                cache_write_usd_per_mtok=found.cache_write_usd_per_mtok, batch_discount=found.batch_discount,
                effective_from=when, source="genai-prices", source_ref=found.ref, actor=actor,
            )
            out[alias] = "created" if created is not None else "unchanged"
        transaction.on_commit(lambda: caches.invalidate(caches.ROUTING))
    return out


# --- alerts -----------------------------------------------------------------------------------


class AlertDeliveryError(Exception):
    """A channel did not take the alert; the delivery task retries with backoff."""


def _usd(value: Decimal | None) -> str:
    return "?" if value is None else f"${value.quantize(Decimal('0.0001'), rounding=ROUND_HALF_UP)}"


def _alert_channels(*, budgets) -> dict[str, str]:
    """Initial delivery state: "pending" for every channel some of these budgets configure."""
    return {"email_status": "pending" if any(b.alert_emails for b in budgets) else "",
            "webhook_status": "pending" if any(b.alert_webhook_url for b in budgets) else ""}


def _alert_store(**fields):
    """Insert the alert once. None when it exists already: the unique constraints decide, so two
    processes (or threads) observing the same crossing store exactly one row."""
    from django.db import IntegrityError, transaction

    from .models import Alert

    try:
        with transaction.atomic():
            alert = Alert.objects.create(**fields)
    except IntegrityError:
        return None
    _alert_deliver_on_commit(alert)
    return alert


def _alert_deliver_on_commit(alert) -> None:
    from django.db import transaction

    from . import tasks

    if alert.email_status:
        transaction.on_commit(lambda: tasks.alert_deliver_email.delay(alert.id))
    if alert.webhook_status:
        transaction.on_commit(lambda: tasks.alert_deliver_webhook.delay(alert.id))


def budget_alert_create(*, budget_id: int, kind: str, period_start, threshold: Decimal = Decimal(0),
                        spent_usd: Decimal, limit_usd: Decimal, forecast_usd: Decimal | None = None,
                        period_end=None):
    """Store a threshold or forecast alert of a budget and queue its deliveries; None when this
    budget already alerted for this kind, period and threshold (or the budget is gone)."""
    from zoneinfo import ZoneInfo

    from .models import AlertKind, Budget

    budget = Budget.objects.select_related("tenant").filter(id=budget_id).first()
    if budget is None:
        return None
    zone = ZoneInfo(budget.tenant.timezone)
    resets = f"; resets {period_end.astimezone(zone):%Y-%m-%d %H:%M %Z}" if period_end else ""
    if kind == AlertKind.FORECAST:
        message = (f"Budget '{budget.name}' ({budget.period}) is forecast to reach {_usd(forecast_usd)} by the end "
                   f"of the period, over its limit of {_usd(limit_usd)}: {_usd(spent_usd)} spent so far{resets}.")
    else:
        pct = (threshold * 100).normalize()
        message = (f"Budget '{budget.name}' ({budget.period}, {budget.enforcement}) reached {pct:f}% of its limit: "
                   f"{_usd(spent_usd)} of {_usd(limit_usd)} spent{resets}.")
    return _alert_store(tenant_id=budget.tenant_id, budget=budget, kind=kind, threshold=threshold,
                        period_start=period_start, spent_usd=spent_usd, limit_usd=limit_usd,
                        forecast_usd=forecast_usd, message=message, **_alert_channels(budgets=[budget]))


def unpriced_model_alert_create(*, tenant_id: int, model: str, period_start):
    """Store the alert that a tenant used a model without a price (once per tenant, model and
    day) and queue its delivery to every alert channel of the tenant's budgets."""
    from .models import AlertKind, Budget

    budgets = list(Budget.objects.filter(tenant_id=tenant_id))
    message = (f"Model '{model}' has no price: its requests are recorded with their tokens but cost $0 until a "
               "price is set (config file, admin or prices_sync).")
    return _alert_store(tenant_id=tenant_id, kind=AlertKind.UNPRICED_MODEL, model=model, period_start=period_start,
                        message=message, **_alert_channels(budgets=budgets))


def _alert_targets(alert) -> tuple[list[str], list[str]]:
    from .models import Budget

    if alert.kind == "unpriced_model":
        budgets = list(Budget.objects.filter(tenant_id=alert.tenant_id))
    else:
        budgets = [alert.budget] if alert.budget_id else []  # a deleted budget's alert goes nowhere
    emails = sorted({e for b in budgets for e in (b.alert_emails or ())})
    hooks = sorted({b.alert_webhook_url for b in budgets if b.alert_webhook_url})
    return emails, hooks


def alert_delivery_mark(*, alert_id: int, channel: str, status: str) -> None:
    """Record how a channel's delivery went (one UPDATE of that channel's own column)."""
    from .models import Alert

    Alert.objects.filter(id=alert_id).update(**{f"{channel}_status": status[:200]})


def alert_payload(alert) -> dict:
    from apps.core.money import money_str

    return {
        "type": f"budget.alert.{alert.kind}",
        "alert": {
            "id": alert.id,
            "kind": alert.kind,
            "tenant": alert.tenant.slug,
            "budget": alert.budget.name if alert.budget_id else None,
            "model": alert.model or None,
            "threshold": format(alert.threshold.normalize(), "f"),
            "period_start": alert.period_start.isoformat(),
            "spent_usd": money_str(alert.spent_usd),
            "limit_usd": money_str(alert.limit_usd),
            "forecast_usd": money_str(alert.forecast_usd),
            "message": alert.message,
            "created_at": alert.created_at.isoformat(),
        },
    }


def alert_email_send(*, alert_id: int) -> None:
    """Send the alert by Django mail to the budget's alert_emails (idempotent: once sent, no-op)."""
    from django.conf import settings
    from django.core.mail import send_mail

    from .models import Alert

    alert = Alert.objects.select_related("tenant", "budget").get(id=alert_id)
    if alert.email_status == "sent":
        return
    emails, _ = _alert_targets(alert)
    if not emails:
        alert_delivery_mark(alert_id=alert.id, channel="email", status="skipped: no recipients")
        return
    subject = f"[LLM Service] {alert.tenant.slug}: {alert.get_kind_display()} alert"
    try:
        send_mail(subject, alert.message, settings.DEFAULT_FROM_EMAIL, emails)
    except Exception as exc:  # SMTP and socket errors alike: the task retries
        raise AlertDeliveryError(f"{type(exc).__name__}: {exc}") from exc
    alert_delivery_mark(alert_id=alert.id, channel="email", status="sent")
