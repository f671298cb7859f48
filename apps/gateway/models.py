"""The data plane's configuration (providers, model aliases, deployments) and its durable work
(async requests, files and batches)."""

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

UNIT_INTERVAL = [MinValueValidator(0), MaxValueValidator(1)]  # a similarity threshold


class ProviderKind(models.TextChoices):
    OPENAI = "openai"
    AZURE_OPENAI = "azure_openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    OPENAI_COMPATIBLE = "openai_compatible"
    MOCK = "mock"
    BEDROCK = "bedrock"
    VERTEX = "vertex"


class Provider(models.Model):
    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=32, choices=ProviderKind.choices)
    api_base = models.URLField(max_length=500, blank=True)
    credential = models.ForeignKey(
        "keys.ProviderCredential", null=True, blank=True, on_delete=models.SET_NULL, related_name="providers"
    )
    # Kind-specific settings, e.g. {"api_version": "2024-10-21"} for Azure, {"organization": ...}.
    options = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"


class RoutingStrategy(models.TextChoices):
    WEIGHTED = "weighted"
    LOWEST_LATENCY = "lowest_latency"
    CHEAPEST = "cheapest"


class ModelAlias(models.Model):
    """The model name clients use. Maps to one or more deployments."""

    alias = models.CharField(max_length=200, unique=True)
    strategy = models.CharField(max_length=20, choices=RoutingStrategy.choices, default=RoutingStrategy.WEIGHTED)
    context_window = models.PositiveIntegerField(default=128_000)
    max_output_tokens = models.PositiveIntegerField(default=16_384)
    supports_streaming = models.BooleanField(default=True)
    # Empty (None): inferred from the deployments' models (apps/gateway/capabilities.py).
    supports_embeddings = models.BooleanField(
        null=True, blank=True, default=None,
        help_text="Empty: inferred from the model (genai-prices data, or a name such as text-embedding-*).")
    supports_chat = models.BooleanField(
        null=True, blank=True, default=None,
        help_text="Empty: inferred (an embedding model does not chat; any other model does).")
    # The rollout (apps/gateway/versions.py): the share of the bare alias's traffic, in percent, each
    # version gets, e.g. {"2024-05-13": 90, "2024-08-06": 10}. Empty: no rollout, every active
    # deployment serves the alias by priority and weight, whatever its version.
    version_shares = models.JSONField(default=dict, blank=True)
    # The version being rolled out and the shares before its rollout began (what a rollback restores).
    rollout_version = models.CharField(max_length=200, blank=True)
    rollout_baseline = models.JSONField(null=True, blank=True)
    semantic_cache_threshold = models.DecimalField(
        max_digits=5, decimal_places=4, null=True, blank=True, validators=UNIT_INTERVAL,
        help_text="The least similarity a semantic cache hit on this model needs, whatever the tenant, key or "
                  "request asks (a stricter floor against false positives). Empty: no floor.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["alias"]
        verbose_name_plural = "model aliases"

    def __str__(self) -> str:
        return self.alias


class Deployment(models.Model):
    alias = models.ForeignKey(ModelAlias, on_delete=models.CASCADE, related_name="deployments")
    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="deployments")
    upstream_model = models.CharField(max_length=200)
    version = models.CharField(
        max_length=100, blank=True,
        help_text="The version's label (e.g. 2024-08-06), clients pin it as alias@label. Empty: the upstream "
                  "model is the version.")
    weight = models.PositiveIntegerField(default=1)
    priority = models.IntegerField(default=0, help_text="Lower is tried first.")
    region = models.CharField(max_length=64, blank=True)
    rpm = models.PositiveIntegerField("requests per minute", null=True, blank=True,
                                      help_text="The provider's own request limit.")
    tpm = models.PositiveIntegerField("tokens per minute", null=True, blank=True,
                                      help_text="The provider's own token limit.")
    # What this deployment costs us, for `cheapest` and `auto`; the alias's price when empty.
    input_usd_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    output_usd_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    is_active = models.BooleanField(default=True)
    # Batches API lines routed here go to the provider's own batch API (OpenAI Batch API, Anthropic
    # Message Batches) at its batch price, instead of one call each (docs/async-and-batches.md).
    provider_batch = models.BooleanField(
        "provider batch API", default=False,
        help_text="Send Batches API lines routed here to the provider's own batch API (OpenAI, Anthropic), "
                  "billed at its batch price.")

    class Meta:
        ordering = ["alias", "priority", "id"]
        constraints = [
            models.UniqueConstraint(fields=["alias", "provider", "upstream_model"], name="uniq_deployment"),
        ]

    def __str__(self) -> str:
        return f"{self.alias.alias} -> {self.provider.name}:{self.upstream_model}"

    @property
    def version_name(self) -> str:
        """The version this deployment serves: its label, else its upstream model."""
        return self.version or self.upstream_model


class DeploymentHealth(models.Model):
    """One probe of a deployment (the beat task `deployments_probe`): up or not, and how fast."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="health_checks")
    checked_at = models.DateTimeField()
    ok = models.BooleanField()
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-checked_at"]
        indexes = [models.Index(fields=["deployment", "-checked_at"])]
        verbose_name_plural = "deployment health checks"

    def __str__(self) -> str:
        return f"{self.deployment_id} {'up' if self.ok else 'down'} at {self.checked_at:%Y-%m-%d %H:%M}"


class JobStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUBMITTED = "submitted"  # a batch line admitted and waiting on a provider's batch API


class AsyncRequest(models.Model):
    """A request accepted with `async: true`, run later by a Celery worker."""

    id = models.CharField(primary_key=True, max_length=64)
    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey("keys.ApiKey", null=True, on_delete=models.SET_NULL, related_name="+")
    endpoint = models.CharField(max_length=64, default="/v1/chat/completions")
    body = models.JSONField()
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED)
    priority = models.IntegerField(default=0)
    callback_url = models.URLField(max_length=1000, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    # What admission took at enqueue (rate-limit slots, budget hold), for the worker to settle or release.
    admission = models.JSONField(null=True, blank=True)
    usage = models.JSONField(null=True, blank=True)
    # A worker owns the request until lease_until; past it, a resume sweep may run it again.
    lease_until = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    webhook_delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


class File(models.Model):
    """An uploaded file (OpenAI Files API); batch inputs, outputs and error files."""

    id = models.CharField(primary_key=True, max_length=64)
    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    purpose = models.CharField(max_length=32)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField(default=0)
    content = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.id} {self.filename}"


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class Batch(models.Model):
    id = models.CharField(primary_key=True, max_length=64)
    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey("keys.ApiKey", null=True, on_delete=models.SET_NULL, related_name="+")
    endpoint = models.CharField(max_length=64)
    input_file = models.ForeignKey(File, on_delete=models.PROTECT, related_name="+")
    output_file = models.ForeignKey(File, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    error_file = models.ForeignKey(File, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    completion_window = models.CharField(max_length=16, default="24h")
    status = models.CharField(max_length=16, choices=BatchStatus.choices, default=BatchStatus.VALIDATING)
    metadata = models.JSONField(null=True, blank=True)
    errors = models.JSONField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    # Last time a worker claimed one of its lines; a resume sweep restarts batches gone quiet.
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "batches"

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


class BatchLine(models.Model):
    """One line of a batch input file; idempotent by (batch, index)."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    index = models.PositiveIntegerField()
    custom_id = models.CharField(max_length=200)
    body = models.JSONField()
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED)
    response = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    # A line sent to a provider's batch API: its upstream batch, and what admission decided (the
    # plan, with its budget hold handed over) for whoever settles it when the results arrive.
    upstream = models.ForeignKey("UpstreamBatch", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="lines")
    plan = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["batch", "index"]
        constraints = [models.UniqueConstraint(fields=["batch", "index"], name="uniq_batch_line")]

    def __str__(self) -> str:
        return f"{self.batch_id}#{self.index}"


class UpstreamStatus(models.TextChoices):
    OPEN = "open"  # lines are being admitted into it
    SUBMITTING = "submitting"  # every line admitted; to be sent to the provider
    SUBMITTED = "submitted"  # the provider has it; polled until it ends
    ENDED = "ended"  # results collected, every line settled or released


class UpstreamBatch(models.Model):
    """The part of a batch sent to one deployment's provider batch API (OpenAI Batch API, Anthropic
    Message Batches). Its state lives here, so polling survives any worker (apps/gateway/provider_batches.py)."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="upstreams")
    deployment = models.ForeignKey(Deployment, null=True, on_delete=models.SET_NULL, related_name="+")
    provider_kind = models.CharField(max_length=32)
    status = models.CharField(max_length=16, choices=UpstreamStatus.choices, default=UpstreamStatus.OPEN)
    upstream_id = models.CharField(max_length=200, blank=True)
    upstream_status = models.CharField(max_length=32, blank=True)
    cancel_sent = models.BooleanField(default=False)
    polls = models.PositiveIntegerField(default=0)
    # When the next poll is due; a row overdue by a lease period lost its task (the resume sweep).
    next_poll_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["batch", "deployment"], name="uniq_upstream_batch")]

    def __str__(self) -> str:
        return f"{self.batch_id} -> {self.provider_kind}:{self.upstream_id or '-'} ({self.status})"


class RateLimitScope(models.TextChoices):
    TENANT = "tenant"
    SOURCE = "source"
    KEY = "key"
    TAG = "tag"
    USER = "user"


class RateLimit(models.Model):
    """RPM/TPM for a tenant, or one of its sources or keys (key limits may also sit on the key), the
    requests carrying a tag (`tag:<name>`), or end users (`user:<id>` one end user, `user:*` each end
    user on its own counter, unless it has a `user:<id>` limit of its own)."""

    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="rate_limits")
    scope = models.CharField(max_length=16, choices=RateLimitScope.choices, default=RateLimitScope.TENANT)
    scope_value = models.CharField(
        max_length=256, blank=True,
        help_text="Source or key name, tag, end user id or * (each end user); empty for tenant.")
    rpm = models.PositiveIntegerField("requests per minute", null=True, blank=True)
    tpm = models.PositiveIntegerField("tokens per minute", null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "scope", "scope_value"], name="uniq_rate_limit")]

    def __str__(self) -> str:
        where = self.scope if not self.scope_value else f"{self.scope}:{self.scope_value}"
        return f"{self.tenant.slug} {where} rpm={self.rpm} tpm={self.tpm}"


class OpsIncident(models.Model):
    """An operational alert: a provider failing or slow, a deployment cooling down, a queue backing
    up (apps/gateway/ops_alerts.py). At most one open incident per key; it is announced once when
    it opens and once when it resolves."""

    key = models.CharField(max_length=200)  # e.g. "provider_errors:openai", "deployment_cooldown:12"
    kind = models.CharField(max_length=32)
    subject = models.CharField(max_length=200)
    message = models.TextField()
    value = models.FloatField(null=True, blank=True)  # the measure that fired it (rate, ms, seconds)
    opened_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    notified_open = models.BooleanField(default=False)
    notified_resolved = models.BooleanField(default=False)

    class Meta:
        ordering = ["-opened_at"]
        constraints = [models.UniqueConstraint(fields=["key"], condition=models.Q(resolved_at__isnull=True),
                                               name="one_open_incident_per_key")]

    def __str__(self) -> str:
        return f"{self.key} ({'resolved' if self.resolved_at else 'open'})"


class StoredResponse(models.Model):
    """A Responses API answer kept with `store: true`, for `previous_response_id`, GET and DELETE:
    the conversation up to and including it (chat messages, instructions excluded), kept per tenant
    until `expires_at` (GATEWAY_RESPONSES_STORE_TTL_S)."""

    id = models.CharField(primary_key=True, max_length=64)
    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey("keys.ApiKey", null=True, on_delete=models.SET_NULL, related_name="+")
    conversation = models.JSONField()
    response = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["expires_at"])]

    def __str__(self) -> str:
        return self.id


class SemanticCacheEntry(models.Model):
    """One answer kept by the semantic cache (apps/gateway/semantic.py), with its prompt's embedding.
    Always searched within (tenant, namespace): the namespace hashes the endpoint, model alias,
    embedding alias and every generation parameter but the messages, so only the prompt may differ."""

    tenant = models.ForeignKey("keys.Tenant", on_delete=models.CASCADE, related_name="+")
    namespace = models.CharField(max_length=64)
    dims = models.PositiveIntegerField()
    vector = models.BinaryField(help_text="float32, little-endian, unit length.")
    response = models.JSONField()
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "namespace", "id"], name="semcache_tenant_ns_id")]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.namespace[:8]}#{self.pk}"
