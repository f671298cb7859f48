"""The usage ledger: one row per gateway request, idempotent on request_id."""

from django.db import models

from apps.core.money import MONEY


class UsageEvent(models.Model):
    """On PostgreSQL the table is partitioned by month on `timestamp` (apps/analytics/partitions.py):
    its primary key there is (id, timestamp), and request_id is kept unique through the
    UsageEventRequest table and a trigger rather than a unique index (which would have to contain
    the timestamp). Django's state still says unique, which is what every backend guarantees."""

    request_id = models.CharField(max_length=64, unique=True)
    timestamp = models.DateTimeField(db_index=True)
    tenant = models.ForeignKey("keys.Tenant", on_delete=models.PROTECT, related_name="+")
    api_key = models.ForeignKey("keys.ApiKey", null=True, on_delete=models.SET_NULL, related_name="+")
    source = models.ForeignKey("keys.Source", null=True, on_delete=models.SET_NULL, related_name="+")
    # The seed's source {type, id}: the source's type and name, or metadata.source_type/source_id
    # when the request names them.
    source_type = models.CharField(max_length=16)
    source_ref = models.CharField(max_length=100)
    request_type = models.CharField(max_length=32, default="chat")
    model = models.CharField(max_length=200)
    deployment = models.ForeignKey("gateway.Deployment", null=True, on_delete=models.SET_NULL, related_name="+")
    provider = models.CharField(max_length=100, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cache_write_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(**MONEY, default=0)
    saved_cost = models.DecimalField(**MONEY, default=0)
    price = models.ForeignKey("billing.Price", null=True, on_delete=models.PROTECT, related_name="+")
    input_usd_per_mtok = models.DecimalField(**MONEY, null=True)
    output_usd_per_mtok = models.DecimalField(**MONEY, null=True)
    status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    latency_ms = models.PositiveIntegerField(default=0)
    cached = models.BooleanField(default=False)
    stream = models.BooleanField(default=False)
    is_async = models.BooleanField(default=False)
    batch_id = models.CharField(max_length=100, blank=True, db_index=True)
    budget_id = models.CharField(max_length=100, blank=True)
    priority = models.SmallIntegerField(default=0)
    estimated = models.BooleanField(default=False, help_text="Tokens counted by us: the provider gave none.")

    class Meta:
        ordering = ["-timestamp", "-id"]
        indexes = [models.Index(fields=["tenant", "timestamp"])]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.cost}"


class UsageEventRequest(models.Model):
    """The ledger's idempotency key on PostgreSQL: one row per request id ever written to the
    partitioned ledger (written by its insert trigger, in the same statement; forgotten when the
    month is dropped by retention). Unused on SQLite, where request_id is unique in the ledger."""

    request_id = models.CharField(max_length=64, primary_key=True)
    timestamp = models.DateTimeField()

    def __str__(self) -> str:
        return self.request_id


# Upper bounds (ms) of the latency histogram kept in the rollups; the last bucket is open-ended.
LATENCY_BUCKETS_MS = (25, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 20000, 60000)
LATENCY_FIELDS = tuple(f"lat_le_{b}" for b in LATENCY_BUCKETS_MS) + ("lat_inf",)


class UsageRollupBase(models.Model):
    """Ledger aggregates per bucket and dimensions, recomputed idempotently from the ledger.

    Dimensions: tenant, bucket (UTC hour or day), model, provider, the seed's source (type, ref),
    the source and key ids, budget_id and the status class (2, 4 or 5 for 2xx/4xx/5xx).
    The latency histogram (`lat_le_<ms>` counts, non-cumulative) gives p50/p95 without raw rows.
    """

    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    bucket = models.DateTimeField()
    model = models.CharField(max_length=200)
    provider = models.CharField(max_length=100, blank=True)
    source_type = models.CharField(max_length=16)
    source_ref = models.CharField(max_length=100)
    source_id = models.BigIntegerField(default=0, help_text="keys.Source id, 0 when none.")
    api_key_id = models.BigIntegerField(default=0, help_text="keys.ApiKey id, 0 when none.")
    budget_id = models.CharField(max_length=100, blank=True)
    status_class = models.PositiveSmallIntegerField()
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    cache_hits = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost = models.DecimalField(**MONEY, default=0)
    saved_cost = models.DecimalField(**MONEY, default=0)
    latency_ms_sum = models.BigIntegerField(default=0)

    class Meta:
        abstract = True


for _name in LATENCY_FIELDS:
    UsageRollupBase.add_to_class(_name, models.PositiveIntegerField(default=0))


class UsageRollupHourly(UsageRollupBase):
    class Meta:
        indexes = [models.Index(fields=["tenant", "bucket"], name="rollup_h_tenant_bucket")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.bucket:%Y-%m-%d %H}h {self.model} {self.requests}"


class UsageRollupDaily(UsageRollupBase):
    class Meta:
        indexes = [models.Index(fields=["tenant", "bucket"], name="rollup_d_tenant_bucket")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.bucket:%Y-%m-%d} {self.model} {self.requests}"


class LedgerRetention(models.Model):
    """A tenant's retention of detailed ledger rows (overrides LEDGER_RETENTION_MONTHS)."""

    tenant = models.OneToOneField("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    months = models.PositiveSmallIntegerField(
        help_text="Whole UTC months kept before the current one; older months are archived, then dropped. "
                  "0 keeps everything. Rollups (dashboards) are kept forever.")

    def __str__(self) -> str:
        return f"{self.tenant_id}: {self.months} months"


class LedgerArchive(models.Model):
    """One tenant's ledger rows of one UTC month, archived (apps/analytics/archive.py). `dropped_at`
    is set once the rows left the database, and cleared by a restore."""

    tenant = models.ForeignKey("keys.Tenant", on_delete=models.PROTECT, related_name="+")
    month = models.DateField(help_text="First day of the UTC month.")
    location = models.CharField(max_length=500, help_text="Where the archive store keeps the file.")
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField(default=0)
    rows = models.BigIntegerField(default=0)
    cost = models.DecimalField(**MONEY, default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    archived_at = models.DateTimeField()
    dropped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-month", "tenant_id"]
        constraints = [models.UniqueConstraint(fields=["tenant", "month"], name="ledger_archive_tenant_month")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.month:%Y-%m} ({self.rows} rows)"
