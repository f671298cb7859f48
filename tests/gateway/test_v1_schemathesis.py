"""Property-based run of the data plane (/v1) from its own OpenAPI document (schemathesis), through
a live gateway (uvicorn, the lean ASGI handler), as a tenant's API key.

For every operation and every generated request (valid and invalid input, NUL bytes and other
control characters in paths, queries and bodies included): no 5xx; the status code, content type
and body are those the document declares (errors in OpenAI's shape); and the other tenant's files,
batches and async requests, asked for by their real ids, do not exist for this key (404), are left
untouched, and nothing of them shows in any answer. Examples are bounded so the whole run stays
well under a minute on two cores."""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from apps.gateway import batches
from apps.gateway.models import AsyncRequest, Batch, File
from tests import factories as f
from tests.conftest import make_setup

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
POSITIVE_EXAMPLES = 6
NEGATIVE_EXAMPLES = 4
ID_EXAMPLES = 2
SECRET = "globex-secret"  # in every object of the other tenant: must never show in an answer
JSONL = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def _objects(tenant, key, tag: str) -> dict[str, dict]:
    """A file, a batch on it and an async request of a tenant, with `tag` in their contents (not in
    their ids, which a 404 may echo back); returns the path parameters naming them."""
    file = batches.file_create(tenant_id=tenant.pk, purpose="batch", filename=f"{tag}.jsonl", content=JSONL)
    batch = Batch.objects.create(id=f"batch_{uuid.uuid4().hex[:24]}", tenant=tenant, api_key=key,
                                 endpoint="/v1/chat/completions", input_file=file, metadata={"owner": tag})
    request = AsyncRequest.objects.create(id=f"req_{uuid.uuid4().hex[:24]}", tenant=tenant, api_key=key,
                                          body={"model": f"{tag}-model", "messages": []}, status="completed",
                                          result={"note": tag})
    from datetime import timedelta

    from django.utils import timezone

    from apps.gateway.models import StoredResponse

    stored = StoredResponse.objects.create(id=f"resp_{uuid.uuid4().hex[:24]}", tenant=tenant, api_key=key,
                                           conversation=[{"role": "user", "content": tag}],
                                           response={"id": "x", "object": "response", "note": tag},
                                           expires_at=timezone.now() + timedelta(days=1))
    return {"file_id": file.id, "batch_id": batch.id, "request_id": request.id, "response_id": stored.id}


@pytest.fixture
def tenants(live_gateway, upstream):
    """acme's key (the caller) with the documented examples' models routed to the fake upstream,
    a budget, and objects of its own; globex's objects, named by SECRET."""
    acme = make_setup(upstream, alias="gpt-4o-mini", tenant=f.TenantFactory(slug="acme"))
    embeddings = make_setup(upstream, alias="text-embedding-3-small", upstream_model="emb-up", tenant=acme.tenant)
    embeddings.deployment.alias.supports_embeddings = True
    embeddings.deployment.alias.save()
    f.BudgetFactory(tenant=acme.tenant, name="acme-monthly")
    own = _objects(acme.tenant, acme.key, "acme-own")
    globex = f.TenantFactory(slug="globex")
    foreign = _objects(globex, f.ApiKeyFactory(tenant=globex), SECRET)
    return acme, own, foreign


def _run(operation, mode: GenerationMode, headers: dict, examples: int, path_parameters=None,
         expect_status: int | None = None) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS)
        assert SECRET not in response.text, (
            case.method, case.formatted_path, response.status_code, response.text[:300])
        if expect_status is not None:
            assert response.status_code == expect_status, (case.method, case.formatted_path, response.text[:300])

    run()


def test_v1_conforms_to_its_schema_and_stays_in_the_tenant(tenants, live_gateway):
    acme, own, foreign = tenants
    headers = {"Authorization": f"Bearer {acme.secret}"}
    schema = schemathesis.openapi.from_url(f"{live_gateway}/v1/openapi.json")
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/files/{file_id}", "/v1/batches"}
    for operation in operations:
        runs = [(GenerationMode.POSITIVE, POSITIVE_EXAMPLES, None, None),
                (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, None, None)]
        names = [p.name for p in operation.path_parameters]
        if names:
            # Its own objects, by their real ids (answers that conform), and the other tenant's:
            # those do not exist for this key, whatever the method.
            runs.append((GenerationMode.POSITIVE, ID_EXAMPLES, {n: own[n] for n in names}, None))
            runs.append((GenerationMode.POSITIVE, ID_EXAMPLES, {n: foreign[n] for n in names}, 404))
        for mode, examples, path_parameters, expect_status in runs:
            try:
                _run(operation, mode, headers, examples, path_parameters, expect_status)
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{operation.label} [{mode}, {path_parameters}]: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    # The other tenant's objects are all still there, unchanged.
    assert File.objects.filter(id=foreign["file_id"]).exists()
    assert Batch.objects.get(id=foreign["batch_id"]).status == "validating"
    assert AsyncRequest.objects.filter(id=foreign["request_id"]).exists()
    from apps.gateway.models import StoredResponse

    assert StoredResponse.objects.filter(id=foreign["response_id"]).exists()  # DELETE of another tenant's: 404
