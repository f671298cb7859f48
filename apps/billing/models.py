"""Prices (versioned, never edited in place) and budgets."""

from decimal import Decimal

from django.db import models

from apps.core.money import MONEY
from apps.keys.outbound import webhook_url_validator


class PriceSource(models.TextChoices):
    GENAI_PRICES = "genai-prices"
    CONFIG = "config"
    ADMIN = "admin"


class Price(models.Model):
    """USD per million tokens for one model alias, in force from `effective_from` until the next
    version. A change of price is a new row; ledger rows point at the version they used."""

    model = models.CharField(max_length=200, db_index=True, help_text="The model alias.")
    input_usd_per_mtok = models.DecimalField(**MONEY)
    output_usd_per_mtok = models.DecimalField(**MONEY)
    cached_input_usd_per_mtok = models.DecimalField(**MONEY, null=True, blank=True)
    cache_write_usd_per_mtok = models.DecimalField(**MONEY, null=True, blank=True)
    batch_discount = models.DecimalField(
        max_digits=5, decimal_places=4, default=Decimal("0"), help_text="0.5 means batch lines cost half."
    )
    effective_from = models.DateTimeField()
    source = models.CharField(max_length=20, choices=PriceSource.choices, default=PriceSource.CONFIG)
    # Where the numbers came from, e.g. the genai-prices "provider/model" id the alias was matched to.
    source_ref = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [models.UniqueConstraint(fields=["model", "effective_from"], name="uniq_price_version")]

    def __str__(self) -> str:
        return (f"{self.model} from {self.effective_from:%Y-%m-%d}: "
                f"in {self.input_usd_per_mtok} out {self.output_usd_per_mtok}")


class BudgetScope(models.TextChoices):
    TENANT = "tenant"
    SOURCE = "source"
    KEY = "key"
    BUDGET_ID = "budget_id"
    TAG = "tag"
    USER = "user"


class BudgetPeriod(models.TextChoices):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    TOTAL = "total"


class Enforcement(models.TextChoices):
    HARD = "hard"
    SOFT = "soft"


class Budget(models.Model):
    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="budgets")
    name = models.CharField(max_length=100)
    scope = models.CharField(max_length=16, choices=BudgetScope.choices, default=BudgetScope.TENANT)
    # Source name, key name or budget id, by scope; empty for tenant scope.
    scope_value = models.CharField(
        max_length=256, blank=True,
        help_text="Which one, by scope: the source's name (scope source), the key's name (key), the "
                  "metadata.budget_id clients send (budget_id), a metadata.tags value (tag), an end user's id "
                  "(user; * gives every end user a budget of this limit of their own). Empty for scope tenant.")
    limit_usd = models.DecimalField("limit (USD)", **MONEY)
    period = models.CharField(max_length=16, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTHLY)
    enforcement = models.CharField(max_length=8, choices=Enforcement.choices, default=Enforcement.HARD)
    alert_thresholds = models.JSONField(default=list, blank=True,
                                        help_text="Shares of the limit that send an alert, e.g. [0.5, 0.8, 1.0].")
    # Instead of refusing a request whose hold does not fit, lower its max_tokens to fit.
    shrink_max_tokens = models.BooleanField(default=False)
    alert_emails = models.JSONField(default=list, blank=True, help_text="Addresses that receive the alerts.")
    # Public addresses only (or WEBHOOK_ALLOWED_HOSTS); checked here and again at every delivery.
    alert_webhook_url = models.URLField(max_length=1000, blank=True, validators=[webhook_url_validator])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="uniq_budget_name")]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"


class AlertKind(models.TextChoices):
    THRESHOLD = "threshold"
    FORECAST = "forecast"
    UNPRICED_MODEL = "unpriced_model"


class DeliveryStatus:
    """What tenants see of an alert's delivery on a channel."""

    PENDING = "pending"
    SENT = "sent"
    RETRYING = "failed (will retry)"
    FAILED = "failed"
    REFUSED = "refused: destination not allowed"
    NO_RECIPIENTS = "skipped: no recipients"
    NO_WEBHOOK = "skipped: no webhook URL"


class Alert(models.Model):
    """One alert, stored whether or not a channel delivered it. The database constraints make a
    threshold fire exactly once per budget, period and threshold, even from many processes; a
    forecast fires once per budget and period (threshold 1 = "will reach the limit"); an unpriced
    model alerts once per tenant, model and (tenant-local) day."""

    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="alerts")
    # SET_NULL: deleting a budget keeps its alert history.
    budget = models.ForeignKey(Budget, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    kind = models.CharField(max_length=20, choices=AlertKind.choices)
    threshold = models.DecimalField(max_digits=8, decimal_places=4, default=Decimal("0"),
                                    help_text="Fraction of the limit, e.g. 0.8.")
    period_start = models.DateTimeField()
    model = models.CharField(max_length=200, blank=True, help_text="The unpriced model alias.")
    spent_usd = models.DecimalField(**MONEY, null=True, blank=True)
    limit_usd = models.DecimalField(**MONEY, null=True, blank=True)
    forecast_usd = models.DecimalField(**MONEY, null=True, blank=True)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # Per channel: "" (not configured), or one of DeliveryStatus. Tenants see these: they never
    # carry network detail (that is an address and port scanner); the server log has it.
    email_status = models.CharField(max_length=200, blank=True)
    webhook_status = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["budget", "kind", "period_start", "threshold"],
                                    condition=models.Q(budget__isnull=False), name="uniq_budget_alert"),
            models.UniqueConstraint(fields=["tenant", "kind", "model", "period_start"],
                                    condition=models.Q(kind="unpriced_model"), name="uniq_unpriced_alert"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.kind} {self.message[:60]}"

    @property
    def delivery(self) -> dict[str, str]:
        """The configured channels and how their delivery went."""
        return {k: v for k, v in (("email", self.email_status), ("webhook", self.webhook_status)) if v}
