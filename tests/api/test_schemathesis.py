"""Property-based run of the whole management API from its own OpenAPI schema (schemathesis),
as three personas: a tenant manager, a tenant admin (both of acme) and a superuser.

For every operation and every generated request (valid and invalid input): no 5xx, the status
code, content type and body are those the schema documents, and a tenant member never reads
anything of the other tenant (globex). Examples are bounded so the whole run stays well under a
minute on two cores."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.utils import timezone
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from apps.analytics.services import usage_rollup_recompute
from apps.keys.models import Membership
from apps.keys.services import audit_record
from tests import factories as f

pytestmark = pytest.mark.django_db

PASSWORD = "pw-12345678"  # tests.factories.UserFactory
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# What a member of acme must never read: the other tenant's slug, objects and people.
FOREIGN = ("globex", "gus-admin", "gil-manager")
POSITIVE_EXAMPLES = 4
NEGATIVE_EXAMPLES = 2
FOREIGN_EXAMPLES = 2
STATEFUL_EXAMPLES = 8
STATEFUL_STEPS = 6


@pytest.fixture
def wsgi_app():
    """Django's WSGI app in this thread, inside the test's transaction: like Django's test client,
    keep request signals from closing the connection that holds it."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield get_wsgi_application()
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def persona(request, world):
    user = getattr(world, request.param)
    token = base64.b64encode(f"{user.username}:{PASSWORD}".encode()).decode()
    return {"name": request.param, "headers": {"Authorization": f"Basic {token}"}}


def _operations(schema):
    for result in schema.get_all_operations():
        yield result.ok()


def _seed(world) -> dict[str, dict]:
    """Something of each kind in both tenants (ledger, rollups, alerts, audit rows, and a global
    audit row without tenant), so lists have rows to leak; returns, per path prefix, the path
    parameters naming globex's object."""
    now = timezone.now()
    for tenant, key in ((world.acme, world.acme_key), (world.globex, world.globex_key)):
        f.UsageEventFactory(tenant=tenant, api_key=key, source_ref=f"{tenant.slug}-app", timestamp=now,
                            batch_id=f"{tenant.slug}-batch")
    usage_rollup_recompute(since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    f.AlertFactory(budget=world.acme_budget)
    globex_alert = f.AlertFactory(budget=world.globex_budget, message="globex at 80%")
    audit_record(actor="root", action="update", object_type="price", object_id="1")  # global: tenant null
    audit_record(actor="ada-admin", action="update", obj=world.acme_source)
    globex_audit = audit_record(actor="gus-admin", action="update", obj=world.globex_source)
    return {
        "/api/tenants/": {"slug": "globex"},
        "/api/members/": {"id": Membership.objects.get(user=world.globex_admin).pk},
        "/api/sources/": {"id": world.globex_source.pk},
        "/api/keys/": {"id": world.globex_key.pk},
        "/api/budgets/": {"id": world.globex_budget.pk},
        "/api/alerts/": {"id": globex_alert.pk},
        "/api/audit-log/": {"id": globex_audit.pk},
    }


def _run_operation(operation, mode: GenerationMode, persona, examples: int, path_parameters=None) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(headers=persona["headers"])
        case.validate_response(response, checks=CHECKS)
        if persona["name"] != "root":
            leaked = [word for word in FOREIGN if word in response.text]
            assert not leaked, (case.method, case.formatted_path, response.status_code, leaked)

    run()


@pytest.mark.parametrize("persona", ["acme_manager", "acme_admin", "root"], indirect=True)
def test_api_conforms_to_its_schema_and_stays_in_the_tenant(world, wsgi_app, persona):
    foreign = _seed(world)
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", wsgi_app, headers=persona["headers"])
    failures = []
    for operation in _operations(schema):
        runs = [(GenerationMode.POSITIVE, POSITIVE_EXAMPLES, None), (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, None)]
        prefix = operation.path.split("{")[0]
        if persona["name"] != "root" and "{" in operation.path and prefix in foreign:
            # The other tenant's own objects, by their real ids: never readable nor writable.
            runs.append((GenerationMode.POSITIVE, FOREIGN_EXAMPLES, foreign[prefix]))
        for mode, examples, path_parameters in runs:
            try:
                _run_operation(operation, mode, persona, examples, path_parameters)
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{operation.label} [{mode}, {path_parameters}]: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("persona", ["acme_admin", "root"], indirect=True)
def test_api_stateful_sequences(world, wsgi_app, persona):
    """Sequences of calls that reuse what earlier calls created (links schemathesis infers from the
    schema: create a source, then read, change or delete it...), with the same checks."""
    _seed(world)
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", wsgi_app, headers=persona["headers"])
    base = schema.as_state_machine()

    class Workflow(base):
        def get_call_kwargs(self, case):
            return {"headers": persona["headers"]}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS)
            if persona["name"] != "root":
                leaked = [word for word in FOREIGN if word in response.text]
                assert not leaked, (case.method, case.formatted_path, response.status_code, leaked)

    Workflow.run(settings=settings(max_examples=STATEFUL_EXAMPLES, stateful_step_count=STATEFUL_STEPS,
                                   deadline=None, database=None, derandomize=True,
                                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck)))
