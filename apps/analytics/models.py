"""The usage ledger: one row per gateway request, idempotent on request_id."""

import json

from django.db import connections, models
from django.db.models import Lookup, Value

from apps.core.money import MONEY
from apps.keys.outbound import webhook_url_validator


class TagsField(models.JSONField):
    """A JSON list of short strings (a request's `metadata.tags`), with the `has_tag` lookup:
    `filter(tags__has_tag="x")`, on PostgreSQL `tags @> '["x"]'`, on SQLite through json_each."""


@TagsField.register_lookup
class HasTag(Lookup):
    lookup_name = "has_tag"
    prepare_rhs = False

    def as_sql(self, compiler, connection):
        lhs, params = self.process_lhs(compiler, connection)
        if connection.vendor == "postgresql":
            return f"{lhs} @> %s::jsonb", [*params, json.dumps([str(self.rhs)])]
        sql = f"EXISTS (SELECT 1 FROM json_each({lhs}) WHERE json_each.value = %s)"  # noqa: S608 - a column
        return sql, [*params, str(self.rhs)]


class UsageEventQuerySet(models.QuerySet):
    def insert_new(self, events: list, *, batch_size: int | None = None) -> None:
        """Insert the events whose request_id is not in the ledger yet (a second insert of the same
        request is a no-op); a row that breaks any other constraint raises. Django's
        ignore_conflicts is ON CONFLICT DO NOTHING on PostgreSQL, which skips duplicates only, but
        INSERT OR IGNORE on SQLite, which would drop a row that breaks a CHECK constraint silently:
        there the conflict is named (a no-op update of the duplicate's request_id)."""
        if connections[self.db].vendor == "sqlite":
            self.bulk_create(events, batch_size=batch_size, update_conflicts=True, unique_fields=["request_id"],
                             update_fields=["request_id"])
        else:
            self.bulk_create(events, batch_size=batch_size, ignore_conflicts=True)


class UsageEvent(models.Model):
    """On PostgreSQL the table is partitioned by month on `timestamp` (apps/analytics/partitions.py):
    its primary key there is (id, timestamp), and request_id is kept unique through the
    UsageEventRequest table and a trigger rather than a unique index (which would have to contain
    the timestamp). Django's state still says unique, which is what every backend guarantees.

    Its references (tenant, key, source, deployment, price) have no constraint in the database
    (`db_constraint=False`; Django still applies their on_delete): a row records what happened, so
    a key or deployment deleted while its request was in flight must not fail the row at commit,
    and the five foreign-key checks (each a row lock on the referenced row) cost about a fifth of
    a millisecond per row at one request in flight (docs/benchmark.md)."""

    request_id = models.CharField(max_length=64, unique=True)
    timestamp = models.DateTimeField(db_index=True)
    tenant = models.ForeignKey("keys.Tenant", on_delete=models.PROTECT, related_name="+", db_constraint=False)
    api_key = models.ForeignKey("keys.ApiKey", null=True, on_delete=models.SET_NULL, related_name="+",
                                db_constraint=False)
    source = models.ForeignKey("keys.Source", null=True, on_delete=models.SET_NULL, related_name="+",
                               db_constraint=False)
    # The seed's source {type, id}: the source's type and name, or metadata.source_type/source_id
    # when the request names them.
    source_type = models.CharField(max_length=16)
    source_ref = models.CharField(max_length=100)
    request_type = models.CharField(max_length=32, default="chat")
    model = models.CharField(max_length=200)
    deployment = models.ForeignKey("gateway.Deployment", null=True, on_delete=models.SET_NULL, related_name="+",
                                   db_constraint=False)
    provider = models.CharField(max_length=100, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    # The version of the model alias that answered (apps/gateway/versions.py): the deployment's label,
    # else its upstream model; empty when no deployment was reached. db_default as for `attempts`.
    model_version = models.CharField(max_length=200, blank=True, default="", db_default="")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cache_write_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(**MONEY, default=0)
    saved_cost = models.DecimalField(**MONEY, default=0)
    price = models.ForeignKey("billing.Price", null=True, on_delete=models.PROTECT, related_name="+",
                              db_constraint=False)
    input_usd_per_mtok = models.DecimalField(**MONEY, null=True)
    output_usd_per_mtok = models.DecimalField(**MONEY, null=True)
    status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    latency_ms = models.PositiveIntegerField(default=0)
    cached = models.BooleanField(default=False)
    # How a cached answer was found: "exact" (apps/gateway/cache.py) or "semantic" (semantic.py),
    # with the prompt's similarity in basis points (0-10000) for a semantic hit. Empty on a miss.
    cache_kind = models.CharField(max_length=16, blank=True, default="", db_default="")
    cache_similarity_bp = models.PositiveSmallIntegerField(null=True, blank=True)
    stream = models.BooleanField(default=False)
    is_async = models.BooleanField(default=False)
    batch_id = models.CharField(max_length=100, blank=True, db_index=True)
    budget_id = models.CharField(max_length=100, blank=True)
    priority = models.SmallIntegerField(default=0)
    estimated = models.BooleanField(default=False, help_text="Tokens counted by us: the provider gave none.")
    # Every upstream attempt, failed ones a fallback hid included (apps/gateway/observe.py): a list of
    # {deployment_id, provider, model, outcome, status, error, start_ms, latency_ms[, ttfb_ms]}.
    # db_default: rows inserted without the column (bulk loaders, a process of the previous release
    # during a rolling deploy) get an empty list.
    attempts = models.JSONField(default=list, blank=True, db_default=Value([], output_field=models.JSONField()))
    # A short digest of what the response cache keys on (tenant, endpoint, alias, messages,
    # parameters), on requests the cache did not answer: repeats of a prompt are visible without its
    # text (apps/analytics/recommendations.py). Tenant-scoped: the same prompt of two tenants differs.
    prompt_hash = models.CharField(max_length=16, blank=True, default="", db_default="")
    # The request's `metadata.tags` (a list of short strings, at most 10) and OpenAI's `user` (the
    # calling application's end user). db_default as for `attempts`.
    tags = TagsField(default=list, blank=True, db_default=Value([], output_field=models.JSONField()))
    end_user = models.CharField(max_length=256, blank=True, default="", db_default="")

    objects = UsageEventQuerySet.as_manager()

    class Meta:
        ordering = ["-timestamp", "-id"]
        indexes = [models.Index(fields=["tenant", "timestamp"]),
                   models.Index(fields=["tenant", "end_user", "timestamp"], name="usage_tenant_enduser_ts")]

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

    Dimensions: tenant, bucket (UTC hour or day), model, its version, provider, the seed's source (type, ref),
    the source and key ids, budget_id and the status class (2, 4 or 5 for 2xx/4xx/5xx).
    The latency histogram (`lat_le_<ms>` counts, non-cumulative) gives p50/p95 without raw rows.
    """

    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    bucket = models.DateTimeField()
    model = models.CharField(max_length=200)
    model_version = models.CharField(max_length=200, blank=True, default="", db_default="")
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
        # bucket alone: the beat's recompute deletes and re-reads recent hours of every tenant
        indexes = [models.Index(fields=["tenant", "bucket"], name="rollup_h_tenant_bucket"),
                   models.Index(fields=["bucket"], name="rollup_h_bucket")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.bucket:%Y-%m-%d %H}h {self.model} {self.requests}"


class UsageRollupDaily(UsageRollupBase):
    class Meta:
        indexes = [models.Index(fields=["tenant", "bucket"], name="rollup_d_tenant_bucket"),
                   models.Index(fields=["bucket"], name="rollup_d_bucket")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.bucket:%Y-%m-%d} {self.model} {self.requests}"


class UsageDimRollupBase(UsageRollupBase):
    """The rollups again, split by one more dimension that the main rollups leave out on purpose:
    `dim` "tag" (one row per tag of a request: a request with two tags counts in both) or "user"
    (the end user; requests without one are not here). Only requests that have tags or an end user
    land here, so the main rollups keep their size; end users can be many, so this table grows with
    the number of active end users per hour, and the dashboard shows only the top ones."""

    dim = models.CharField(max_length=8)  # tag | user
    value = models.CharField(max_length=256)

    class Meta:
        abstract = True


class UsageDimRollupHourly(UsageDimRollupBase):
    class Meta:
        indexes = [models.Index(fields=["tenant", "dim", "bucket"], name="dimrollup_h_tenant_dim_bucket")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.bucket:%Y-%m-%d %H}h {self.dim}={self.value} {self.requests}"


class UsageDimRollupDaily(UsageDimRollupBase):
    class Meta:
        indexes = [models.Index(fields=["tenant", "dim", "bucket"], name="dimrollup_d_tenant_dim_bucket")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.bucket:%Y-%m-%d} {self.dim}={self.value} {self.requests}"


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


class AttemptRollupHourly(models.Model):
    """Upstream attempts per UTC hour, tenant, model alias, provider, deployment and outcome, rebuilt
    with the usage rollups from the ledger rows' `attempts`: provider availability comes from here."""

    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    bucket = models.DateTimeField()
    model = models.CharField(max_length=200)
    source_ref = models.CharField(max_length=100)
    provider = models.CharField(max_length=100)
    deployment_id = models.BigIntegerField(default=0)
    outcome = models.CharField(max_length=16)
    attempts = models.PositiveIntegerField(default=0)
    latency_ms_sum = models.BigIntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["tenant", "bucket"], name="attempt_h_tenant_bucket"),
                   models.Index(fields=["bucket"], name="attempt_h_bucket")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.bucket:%Y-%m-%d %H}h {self.provider} {self.outcome} {self.attempts}"


class RequestLogPolicy(models.Model):
    """A tenant's request logging (`request_log:` in gateway_apply, or the admin). Without one, or
    disabled, nothing is logged; with `bodies` off, a log has the attempts and timings but never
    the bodies."""

    tenant = models.OneToOneField("keys.Tenant", on_delete=models.CASCADE, related_name="request_log_policy")
    enabled = models.BooleanField(default=True)
    bodies = models.BooleanField(default=False, help_text="Store request and response bodies (redacted, capped).")
    retention_days = models.PositiveIntegerField(default=30)
    redact_patterns = models.JSONField(default=list, blank=True,
                                       help_text="Extra regular expressions whose matches are redacted from bodies.")

    def __str__(self) -> str:
        return f"request log of {self.tenant_id}: {'on' if self.enabled else 'off'}"


class RequestLog(models.Model):
    """What one request sent and got back, for a tenant that turned request logs on: the bodies
    (redacted, size-capped; only with `bodies` on), the upstream attempts and the timings."""

    request_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    timestamp = models.DateTimeField()
    api_key = models.ForeignKey("keys.ApiKey", null=True, on_delete=models.SET_NULL, related_name="+")
    source_ref = models.CharField(max_length=100, blank=True)
    request_type = models.CharField(max_length=32, default="chat")
    model = models.CharField(max_length=200, blank=True)
    model_version = models.CharField(max_length=200, blank=True, default="")
    provider = models.CharField(max_length=100, blank=True)
    status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    budget_id = models.CharField(max_length=100, blank=True)
    tags = TagsField(default=list, blank=True)
    end_user = models.CharField(max_length=256, blank=True)
    stream = models.BooleanField(default=False)
    cached = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(default=0)
    request_body = models.TextField(blank=True)
    response_body = models.TextField(blank=True)
    request_truncated = models.BooleanField(default=False)
    response_truncated = models.BooleanField(default=False)
    attempts = models.JSONField(default=list, blank=True)
    timings = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-timestamp", "-id"]
        indexes = [models.Index(fields=["tenant", "timestamp"], name="reqlog_tenant_ts")]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.status}"


class UsageStream(models.Model):
    """A tenant's subscription to its usage events, pushed in batches to a webhook
    (apps/analytics/usage_stream.py). Delivery follows the ledger by id from `cursor` (the last id
    delivered); `horizon` is the highest ledger id seen at the previous run (only ids below it are
    delivered, so a row still being committed is never skipped)."""

    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="usage_streams")
    url = models.URLField(max_length=1000, validators=[webhook_url_validator])
    is_active = models.BooleanField(default=True)
    cursor = models.BigIntegerField(null=True, blank=True, help_text="Last ledger id delivered (empty: start now).")
    horizon = models.BigIntegerField(null=True, blank=True)
    failures = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    last_delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=200, blank=True)

    def __str__(self) -> str:
        return f"usage stream of {self.tenant_id} to {self.url}"
