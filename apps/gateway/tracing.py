"""OpenTelemetry traces of gateway requests (the official SDK and its OTLP/HTTP exporter).

Off by default, at no cost: unless settings.OTEL_TRACES_ENABLED (an OTLP endpoint configured by the
standard OTEL_* variables), nothing here is imported from the SDK and the pipeline records no step
timings. When on, each request that reached its ledger row becomes one trace, emitted once the row
is durable from what the request context recorded (no span is open while the request runs, and no
context propagation machinery sits on the hot path):

    <operation> <alias>               SERVER  the request (continues the client's W3C `traceparent`)
      gateway.cache                   INTERNAL the cache lookup
      gateway.admission               INTERNAL rate limits and budget hold
      <operation> <upstream model>    CLIENT  one per upstream attempt, failed ones included
      gateway.ledger                  INTERNAL the ledger write

with the GenAI semantic-convention attributes (`gen_ai.operation.name`, `gen_ai.system` and
`gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.response.model`,
`gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, ...). Spans are batched and exported in a
background thread (BatchSpanProcessor); the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT,
_HEADERS, _TIMEOUT, and the resource OTEL_SERVICE_NAME (default `llm-service`) and
OTEL_RESOURCE_ATTRIBUTES.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings

ENABLED: bool = bool(getattr(settings, "OTEL_TRACES_ENABLED", False))

# Provider adapter -> the GenAI semantic conventions' provider name.
GEN_AI_SYSTEM = {"openai": "openai", "openai_compatible": "openai", "azure_openai": "azure.ai.openai",
                 "anthropic": "anthropic", "gemini": "gcp.gemini", "mock": "mock"}
OPERATION = {"chat": "chat", "embeddings": "embeddings"}

_provider = None
_tracer = None
_lock = threading.Lock()


def setup(*, exporter=None):
    """Create the tracer provider (once): a BatchSpanProcessor over the OTLP/HTTP exporter, or the
    exporter given (tests). Returns the provider."""
    global _provider, _tracer
    with _lock:
        if _provider is None:
            from opentelemetry.sdk.resources import OTELResourceDetector, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            if exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()
            resource = Resource.create({"service.name": "llm-service"}).merge(OTELResourceDetector().detect())
            provider = TracerProvider(resource=resource)
            provider.add_span_processor(BatchSpanProcessor(exporter))
            _provider, _tracer = provider, provider.get_tracer("apps.gateway")
    return _provider


def enable(*, exporter=None) -> None:
    """Turn tracing on in this process (as OTEL_* would at start-up)."""
    global ENABLED
    setup(exporter=exporter)
    ENABLED = True


def shutdown() -> None:
    """Flush and stop; tracing is off afterwards."""
    global ENABLED, _provider, _tracer
    ENABLED = False
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def flush(timeout_ms: int = 5000) -> bool:
    return _provider.force_flush(timeout_ms) if _provider is not None else True


def _parent(traceparent: str):
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def request_spans(ctx, attempts: list[dict]) -> None:
    """Emit the trace of one finished request (see the module docstring)."""
    if _tracer is None:
        setup()
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    now_ns, now_perf = time.time_ns(), time.perf_counter()

    def ns(perf: float) -> int:
        return now_ns - int((now_perf - perf) * 1e9)

    operation = OPERATION.get(ctx.kind, ctx.kind)
    d = ctx.deployment
    usage = ctx.usage
    attrs = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": ctx.model,
        "gen_ai.request.stream": ctx.stream,
        "llm.request_id": ctx.request_id,
        "llm.tenant_id": ctx.auth.tenant_id,
        "llm.cached": ctx.cached,
        "llm.cost_usd": str(ctx.cost),
        "llm.attempts": len(attempts),
        "llm.model_version": ctx.model_version,
        "http.response.status_code": ctx.status,
    }
    if d is not None:
        system = GEN_AI_SYSTEM.get(d.target.kind, d.target.kind)
        attrs.update({"gen_ai.system": system, "gen_ai.provider.name": system,
                      "gen_ai.response.model": d.target.upstream_model, "llm.provider": d.provider_name})
    if usage is not None:
        attrs.update({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                      "gen_ai.usage.output_tokens": usage.completion_tokens})
    if ctx.request is not None:
        body = ctx.request.body
        for key, attr in (("max_tokens", "gen_ai.request.max_tokens"), ("temperature", "gen_ai.request.temperature"),
                          ("top_p", "gen_ai.request.top_p")):
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attrs[attr] = value
    if ctx.error_code:
        attrs["error.type"] = ctx.error_code

    root = _tracer.start_span(f"{operation} {ctx.model}".strip(), context=_parent(ctx.traceparent),
                              kind=SpanKind.SERVER, start_time=ns(ctx.started), attributes=attrs)
    if ctx.status >= 500:
        root.set_status(Status(StatusCode.ERROR, ctx.error_code))
    inside = trace.set_span_in_context(root)
    for name in ("cache", "admission"):
        if name in ctx.marks:
            start, end = ctx.marks[name]
            _tracer.start_span(f"gateway.{name}", context=inside, start_time=ns(start)).end(end_time=ns(end))
    for a, plain in zip(ctx.attempt_log, attempts, strict=True):
        system = GEN_AI_SYSTEM.get(a.kind, a.kind)
        span = _tracer.start_span(
            f"{operation} {a.upstream_model}", context=inside, kind=SpanKind.CLIENT, start_time=ns(a.start),
            attributes={"gen_ai.operation.name": operation, "gen_ai.system": system, "gen_ai.provider.name": system,
                        "gen_ai.request.model": a.upstream_model, "llm.provider": a.provider,
                        "llm.deployment_id": a.deployment_id, "llm.attempt.outcome": a.outcome,
                        **({"http.response.status_code": a.status} if a.status else {}),
                        **({"error.type": a.error} if a.error else {}),
                        **({"gen_ai.response.time_to_first_chunk": plain["ttfb_ms"] / 1000}
                           if "ttfb_ms" in plain else {})})
        if a.outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, a.error or a.outcome))
        span.end(end_time=ns(a.end))
    if "ledger" in ctx.marks:
        start, end = ctx.marks["ledger"]
        _tracer.start_span("gateway.ledger", context=inside, start_time=ns(start)).end(end_time=ns(end))
    root.end(end_time=now_ns)
