"""Tenant slugs are immutable for everyone but superusers, and an operator's command never writes
into a tenant that was renamed to the slug it names (slug squatting), unless told to adopt it."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from apps.keys.models import ApiKey, AuditLog, Tenant
from tests import factories as f

pytestmark = pytest.mark.django_db

CONFIG = """
tenants:
  - slug: {slug}
    name: The Real {slug}
    timezone: UTC
    sources: [{{name: bot, type: application}}]
"""


def api(user) -> APIClient:
    c = APIClient()
    c.force_authenticate(user)
    return c


def test_tenant_admin_cannot_rename_their_tenant(world):
    resp = api(world.acme_admin).patch("/api/tenants/acme/", {"slug": "bigcorp"}, format="json")
    assert resp.status_code == 400
    assert "slug" in resp.json()
    assert Tenant.objects.filter(slug="acme").exists()
    assert not Tenant.objects.filter(slug="bigcorp").exists()


def test_tenant_admin_put_with_the_same_slug_is_fine(world):
    c = api(world.acme_owner)
    body = {**c.get("/api/tenants/acme/").json(), "name": "Acme Two"}
    resp = c.put("/api/tenants/acme/", body, format="json")
    assert resp.status_code == 200, resp.content
    assert Tenant.objects.get(slug="acme").name == "Acme Two"


def test_renaming_to_another_tenants_slug_reveals_nothing(world):
    """The slug oracle: the answer for an existing slug and an unknown one is the same."""
    c = api(world.acme_admin)
    taken = c.patch("/api/tenants/acme/", {"slug": "globex"}, format="json")
    free = c.patch("/api/tenants/acme/", {"slug": "no-such-tenant"}, format="json")
    assert taken.status_code == free.status_code == 400
    assert taken.json() == free.json()
    assert "exist" not in taken.content.decode()


def test_superuser_may_rename_and_created_slug_keeps_the_original(world):
    resp = api(world.root).patch("/api/tenants/acme/", {"slug": "acme-renamed"}, format="json")
    assert resp.status_code == 200, resp.content
    assert resp.json()["slug"] == "acme-renamed"
    assert resp.json()["created_slug"] == "acme"


def test_admin_site_slug_is_read_only_for_tenant_admins(client, world):
    client.force_login(world.acme_admin)
    html = client.get(f"/admin/keys/tenant/{world.acme.pk}/change/").content.decode()
    assert 'name="slug"' not in html


def _squat(world, slug="bigcorp"):
    """How the attack ran before: a tenant admin renames their own tenant to a slug the operator
    is about to use. Now only a superuser can rename, so the rename is done as root here to get a
    renamed tenant at all."""
    assert api(world.acme_admin).patch("/api/tenants/acme/", {"slug": slug}, format="json").status_code == 400
    assert api(world.root).patch("/api/tenants/acme/", {"slug": slug}, format="json").status_code == 200
    return Tenant.objects.get(slug=slug)


def test_gateway_apply_refuses_a_renamed_tenant_without_adopt(world, tmp_path):
    renamed = _squat(world)
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG.format(slug="bigcorp"))
    with pytest.raises(CommandError, match="created as 'acme'.*--adopt"):
        call_command("gateway_apply", str(path), stdout=StringIO())
    renamed.refresh_from_db()
    assert renamed.name == "Acme"  # nothing changed
    assert not renamed.sources.filter(name="bot").exists()

    call_command("gateway_apply", str(path), "--adopt", stdout=StringIO())
    renamed.refresh_from_db()
    assert renamed.name == "The Real bigcorp"
    assert renamed.created_slug == "bigcorp"
    assert AuditLog.objects.filter(action="adopt", object_id=str(renamed.pk)).exists()
    call_command("gateway_apply", str(path), stdout=StringIO())  # adopted once, for good


def test_gateway_apply_creates_and_updates_unrenamed_tenants_as_before(world, tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG.format(slug="acme"))
    call_command("gateway_apply", str(path), stdout=StringIO())
    path.write_text(CONFIG.format(slug="initech"))
    call_command("gateway_apply", str(path), stdout=StringIO())
    assert Tenant.objects.get(slug="acme").name == "The Real acme"
    assert Tenant.objects.get(slug="initech").created_slug == "initech"


def test_key_create_refuses_a_renamed_tenant_without_adopt(world):
    renamed = _squat(world)
    with pytest.raises(CommandError, match="--adopt"):
        call_command("key_create", "--tenant", "bigcorp", "--source", "acme-bot", "--name", "ops",
                     stdout=StringIO())
    assert not ApiKey.objects.filter(name="ops").exists()
    out = StringIO()
    call_command("key_create", "--tenant", "bigcorp", "--source", "acme-bot", "--name", "ops", "--adopt",
                 stdout=out)
    assert ApiKey.objects.get(name="ops").tenant == renamed


def test_existing_tenants_are_backfilled_and_new_ones_record_their_slug():
    t = f.TenantFactory(slug="fresh")
    assert t.created_slug == "fresh"
    Tenant.objects.filter(pk=t.pk).update(created_slug="")
    from importlib import import_module

    from django.apps import apps as global_apps

    import_module("apps.keys.migrations.0006_tenant_created_slug").backfill(global_apps, None)
    t.refresh_from_db()
    assert t.created_slug == "fresh"
