"""POST /api/members/ (and the admin's member form): a tenant admin creates new users, or attaches
users they already administer; never another tenant's user, and never echoes that user's data."""

import pytest
from rest_framework.test import APIClient

from apps.keys.models import Membership
from tests import factories as f
from tests.keys.personas import member

pytestmark = pytest.mark.django_db


def api(user) -> APIClient:
    c = APIClient()
    c.force_authenticate(user)
    return c


def test_tenant_admin_cannot_attach_another_tenants_user_nor_read_their_email(world):
    resp = api(world.acme_admin).post("/api/members/", {"tenant": "acme", "username": "gil-manager",
                                                       "role": "viewer"}, format="json")
    assert resp.status_code == 400
    body = resp.content.decode()
    assert world.globex_manager.email not in body
    assert "globex" not in body
    assert "username" in resp.json()
    assert not Membership.objects.filter(user=world.globex_manager, tenant=world.acme).exists()


def test_admin_site_cannot_attach_another_tenants_user(client, world):
    client.force_login(world.acme_admin)
    resp = client.post("/admin/keys/membership/add/", {"tenant": world.acme.pk, "username": "gil-manager",
                                                       "role": "viewer"}, follow=True)
    assert world.globex_manager.email not in resp.content.decode()
    assert not Membership.objects.filter(user=world.globex_manager, tenant=world.acme).exists()


def test_tenant_admin_attaches_a_user_of_another_tenant_they_administer(world):
    initech = f.TenantFactory(slug="initech")
    f.MembershipFactory(user=world.acme_admin, tenant=initech, role="admin")
    peter = member(initech, "viewer", "peter")
    resp = api(world.acme_admin).post("/api/members/", {"tenant": "acme", "username": "peter", "role": "manager"},
                                      format="json")
    assert resp.status_code == 201, resp.content
    assert Membership.objects.get(user=peter, tenant=world.acme).role == "manager"


def test_tenant_admin_still_creates_new_users(world):
    resp = api(world.acme_admin).post("/api/members/", {"tenant": "acme", "username": "newbie",
                                                       "email": "newbie@acme.test", "password": "long-pass-1",
                                                       "role": "viewer"}, format="json")
    assert resp.status_code == 201, resp.content
    assert resp.json()["email"] == "newbie@acme.test"


def test_superuser_attaches_anyone(world):
    resp = api(world.root).post("/api/members/", {"tenant": "acme", "username": "gil-manager", "role": "viewer"},
                                format="json")
    assert resp.status_code == 201, resp.content
    assert Membership.objects.filter(user=world.globex_manager, tenant=world.acme).exists()


def test_role_defaults_to_viewer(world):
    """Before: KeyError 'role', a 500."""
    resp = api(world.acme_admin).post("/api/members/", {"tenant": "acme", "username": "quiet"}, format="json")
    assert resp.status_code == 201, resp.content
    assert resp.json()["role"] == "viewer"
