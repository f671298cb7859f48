"""OpenTelemetry traces: exported over OTLP/HTTP (protobuf) to a receiver on loopback, one span per
request continuing the client's traceparent, with children for cache, admission, every upstream
attempt and the ledger write. Off by default, at no cost."""

import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from apps.gateway import pipeline, tracing
from tests import factories as f

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class OtlpReceiver:
    """A minimal OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest it is POSTed."""

    def __init__(self):
        self.spans: list = []
        self.resources: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                data = self.rfile.read(int(self.headers["content-length"]))
                message = ExportTraceServiceRequest()
                message.ParseFromString(data)
                for rs in message.resource_spans:
                    receiver.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(monkeypatch):
    with OtlpReceiver() as r:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", r.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-under-test")
        tracing.enable()  # as the OTEL_* variables would at start-up: the real OTLP/HTTP exporter
        yield r
        tracing.shutdown()


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = {"string_value": v.string_value, "int_value": v.int_value, "bool_value": v.bool_value,
                       "double_value": v.double_value}[v.WhichOneof("value")]
    return out


def _spans_of(receiver, trace_id_hex: str, at_least: int) -> list:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tracing.flush()
        found = [s for s in receiver.spans if s.trace_id.hex() == trace_id_hex]
        if len(found) >= at_least:
            return found
        time.sleep(0.02)
    raise AssertionError(f"got {len(receiver.spans)} spans, not {at_least} of trace {trace_id_hex}")


def test_spans_reach_the_otlp_receiver_with_the_clients_parent(live_gateway, upstream, receiver):
    cred = f.ProviderCredentialFactory()
    primary = f.ProviderFactory(name="primary-up", kind="openai_compatible", api_base=upstream.base_url,
                                credential=cred)
    alias = f.ModelAliasFactory(alias="traced")
    f.DeploymentFactory(alias=alias, provider=primary, upstream_model="fail-503", priority=0)
    f.DeploymentFactory(alias=alias, provider=f.ProviderFactory(name="mock", kind="mock"), upstream_model="mock-1",
                        priority=1)
    f.PriceFactory(model="traced", input_usd_per_mtok=Decimal(1), output_usd_per_mtok=Decimal(2))
    key = f.ApiKeyFactory()
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=key.secret, max_retries=0)

    client.chat.completions.create(model="traced", messages=[{"role": "user", "content": "hi"}], max_tokens=50,
                                   extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})

    spans = _spans_of(receiver, TRACE_ID, at_least=6)
    by_name = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    root = by_name["chat traced"][0]
    assert root.parent_span_id.hex() == PARENT_ID  # the client's span is the parent
    assert root.kind == root.SPAN_KIND_SERVER
    attrs = _attrs(root)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "traced"
    assert attrs["gen_ai.response.model"] == "mock-1"
    assert attrs["gen_ai.system"] == "mock"
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["gen_ai.request.max_tokens"] == 50
    assert attrs["http.response.status_code"] == 200

    children = [s for s in spans if s is not root]
    assert all(s.parent_span_id == root.span_id for s in children)
    assert {"gateway.cache", "gateway.admission", "gateway.ledger"} <= set(by_name)
    attempts = sorted(by_name["chat fail-503"] + by_name["chat mock-1"], key=lambda s: s.start_time_unix_nano)
    assert [_attrs(s)["llm.attempt.outcome"] for s in attempts] == ["error", "error", "ok"]
    assert _attrs(attempts[0])["gen_ai.system"] == "openai"
    assert _attrs(attempts[0])["http.response.status_code"] == 503
    assert attempts[0].status.code == attempts[0].status.STATUS_CODE_ERROR
    assert all(root.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano
               <= root.end_time_unix_nano for s in children)
    assert {"service.name": "gateway-under-test"}.items() <= receiver.resources[0].items()


def test_a_request_without_traceparent_starts_its_own_trace(live_gateway, upstream, receiver):
    from tests.conftest import make_setup

    s = make_setup(upstream)
    client = openai.OpenAI(base_url=f"{live_gateway}/v1", api_key=s.secret, max_retries=0)

    client.chat.completions.create(model=s.alias, messages=[{"role": "user", "content": "hi"}])

    deadline = time.monotonic() + 10
    while not [x for x in receiver.spans if x.name == f"chat {s.alias}"] and time.monotonic() < deadline:
        tracing.flush()
        time.sleep(0.02)
    root = next(x for x in receiver.spans if x.name == f"chat {s.alias}")
    assert root.parent_span_id == b""
    assert sum(x.trace_id == root.trace_id for x in receiver.spans) == 5  # cache, admission, attempt, ledger


@pytest.mark.django_db
def test_tracing_is_off_by_default_and_costs_nothing(setup, client):
    import orjson

    assert tracing.ENABLED is False and tracing._provider is None
    seen = []
    original = pipeline.observe.finished

    async def spy(ctx, *args):
        seen.append(ctx)
        await original(ctx, *args)

    pipeline.observe.finished = spy
    try:
        body = {"model": setup.alias, "messages": [{"role": "user", "content": "x"}]}
        assert client.post("/v1/chat/completions", data=orjson.dumps(body), content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {setup.secret}").status_code == 200
    finally:
        pipeline.observe.finished = original
    assert seen == []  # no request log, no trace: the request was not watched at all
    assert tracing._provider is None
