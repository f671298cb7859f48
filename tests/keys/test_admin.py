"""The Django admin is tenant-scoped: querysets, FK choices, filters and object permissions."""

import re

import pytest
from django.urls import reverse

from apps.keys import crypto
from apps.keys.models import ApiKey, AuditLog, Membership
from tests import factories as f

pytestmark = pytest.mark.django_db


def login(client, user):
    client.force_login(user)
    return client


def changelist(model):
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def test_tenant_admin_lists_only_own_tenant(client, world):
    login(client, world.acme_admin)
    for url, mine, theirs in [
        ("/admin/keys/apikey/", "acme-key", "globex-key"),
        ("/admin/keys/source/", "acme-bot", "globex-etl"),
        ("/admin/billing/budget/", "acme-monthly", "globex-monthly"),
        ("/admin/keys/membership/", "max-manager", "gil-manager"),
        ("/admin/keys/tenant/", "Acme", "Globex"),
    ]:
        html = client.get(url).content.decode()
        assert mine in html, url
        assert theirs not in html, url


def test_tenant_filter_offers_only_own_tenants(client, world):
    html = login(client, world.acme_manager).get("/admin/keys/apikey/").content.decode()
    assert "?tenant=" + str(world.acme.id) in html
    assert "?tenant=" + str(world.globex.id) not in html


def test_other_tenants_objects_cannot_be_opened(client, world):
    login(client, world.acme_admin)
    for url in [f"/admin/keys/apikey/{world.globex_key.pk}/change/",
                f"/admin/billing/budget/{world.globex_budget.pk}/change/",
                f"/admin/keys/tenant/{world.globex.pk}/change/"]:
        resp = client.get(url)
        assert resp.status_code == 302, url  # "doesn't exist", back to the index
        assert resp["Location"] == "/admin/"
    resp = client.post(f"/admin/billing/budget/{world.globex_budget.pk}/delete/", {"post": "yes"})
    assert resp.status_code == 302
    world.globex_budget.refresh_from_db()


def test_fk_choices_are_limited_to_managed_tenants(client, world):
    html = login(client, world.acme_admin).get("/admin/keys/apikey/add/").content.decode()
    assert "acme-bot" in html
    assert "globex-etl" not in html
    assert f'value="{world.globex.pk}"' not in html
    resp = client.post("/admin/keys/apikey/add/", {"tenant": world.acme.pk, "source": world.globex_source.pk,
                                                   "name": "sneaky"})
    assert resp.status_code == 200
    assert "Select a valid choice" in resp.content.decode()
    assert not ApiKey.objects.filter(name="sneaky").exists()


def test_tenant_admin_creates_key_and_sees_secret_once(client, world):
    login(client, world.acme_admin)
    resp = client.post("/admin/keys/apikey/add/", {
        "tenant": world.acme.pk, "source": world.acme_source.pk, "name": "new-key",
        "rpm": "60", "default_budget_id": "", "cache_enabled": "unknown"})
    assert resp.status_code == 200
    secret = re.search(r'id="api-key-secret"[^>]*>([^<]+)<', resp.content.decode()).group(1)
    key = ApiKey.objects.get(name="new-key")
    assert key.digest == crypto.api_key_digest(secret)
    assert key.tenant == world.acme
    assert key.rpm == 60
    assert AuditLog.objects.filter(object_type="apikey", object_id=str(key.pk), action="create",
                                   actor="ada-admin").exists()
    assert secret not in client.get(f"/admin/keys/apikey/{key.pk}/change/").content.decode()
    assert secret not in client.get("/admin/keys/apikey/").content.decode()


def test_model_access_is_edited_on_the_key(client, world):
    f.ModelAliasFactory(alias="gpt-4o-mini")
    f.ModelAliasFactory(alias="claude-3-5-haiku")
    login(client, world.acme_admin)
    resp = client.post(f"/admin/keys/apikey/{world.acme_key.pk}/change/", {
        "source": world.acme_source.pk, "name": "acme-key", "allowed_models": ["gpt-4o-mini"],
        "default_budget_id": "", "cache_enabled": "unknown"})
    assert resp.status_code == 302, resp.content.decode()[:2000]
    world.acme_key.refresh_from_db()
    assert world.acme_key.allowed_models == ["gpt-4o-mini"]
    entry = AuditLog.objects.filter(object_type="apikey", action="update").get()
    assert entry.before["allowed_models"] == []
    assert entry.after["allowed_models"] == ["gpt-4o-mini"]


@pytest.mark.parametrize("persona", ["acme_manager", "acme_viewer"])
def test_managers_and_viewers_read_only(client, world, persona):
    login(client, getattr(world, persona))
    assert client.get("/admin/keys/apikey/").status_code == 200
    page = client.get(f"/admin/keys/apikey/{world.acme_key.pk}/change/")
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert client.get("/admin/keys/apikey/add/").status_code == 403
    resp = client.post(f"/admin/billing/budget/{world.acme_budget.pk}/change/", {"name": "renamed"})
    assert resp.status_code == 403
    assert client.post(f"/admin/keys/apikey/{world.acme_key.pk}/delete/", {"post": "yes"}).status_code == 403


def test_viewers_do_not_see_the_audit_log_or_ledger(client, world):
    html = login(client, world.acme_viewer).get("/admin/").content.decode()
    assert "Audit logs" not in html
    assert "Usage events" not in html
    assert "Api keys" in html


def test_admin_changes_are_audited(client, world):
    login(client, world.acme_admin)
    resp = client.post(f"/admin/billing/budget/{world.acme_budget.pk}/change/", {
        "tenant": world.acme.pk, "name": "acme-monthly", "scope": "tenant", "scope_value": "", "limit_usd": "25",
        "period": "monthly", "enforcement": "hard", "alert_thresholds": "", "alert_emails": "",
        "alert_webhook_url": ""})
    assert resp.status_code == 302, resp.content.decode()[:3000]
    entry = AuditLog.objects.get(object_type="budget", action="update")
    assert entry.actor == "ada-admin"
    assert entry.tenant == world.acme
    assert entry.after["limit_usd"] != entry.before["limit_usd"]


def test_tenant_admin_adds_member_by_username(client, world):
    login(client, world.acme_admin)
    resp = client.post("/admin/keys/membership/add/", {"tenant": world.acme.pk, "username": "newbie",
                                                       "email": "newbie@acme.test", "password": "long-password-1",
                                                       "role": "manager"})
    assert resp.status_code == 302, resp.content.decode()[:3000]
    m = Membership.objects.get(user__username="newbie")
    assert m.tenant == world.acme
    assert m.role == "manager"
    assert m.user.is_staff
    assert m.user.check_password("long-password-1")


def test_only_owners_grant_owner(client, world):
    membership = Membership.objects.get(user=world.acme_manager)
    login(client, world.acme_admin)
    client.post(f"/admin/keys/membership/{membership.pk}/change/", {"role": "owner"})
    membership.refresh_from_db()
    assert membership.role == "manager"
    login(client, world.acme_owner)
    client.post(f"/admin/keys/membership/{membership.pk}/change/", {"role": "owner"})
    membership.refresh_from_db()
    assert membership.role == "owner"


def test_superuser_sees_everything(client, world):
    html = login(client, world.root).get("/admin/keys/apikey/").content.decode()
    assert "acme-key" in html
    assert "globex-key" in html


@pytest.mark.parametrize(("url", "factory"), [
    ("/admin/keys/apikey/", lambda t, s: f.ApiKeyFactory(tenant=t, source=s)),
    ("/admin/keys/source/", lambda t, s: f.SourceFactory(tenant=t)),
    ("/admin/billing/budget/", lambda t, s: f.BudgetFactory(tenant=t)),
    ("/admin/keys/membership/", lambda t, s: f.MembershipFactory(tenant=t)),
    ("/admin/keys/auditlog/", lambda t, s: f.AuditLogFactory(tenant=t)),
    ("/admin/analytics/usageevent/", lambda t, s: f.UsageEventFactory(tenant=t)),
])
def test_changelist_query_count_does_not_grow_with_rows(client, world, django_assert_num_queries, url, factory):
    login(client, world.acme_admin)
    factory(world.acme, world.acme_source)  # a page with one row, then with six
    client.get(url)  # warm caches (content types, site)
    with django_assert_num_queries(CHANGELIST_QUERIES[url]) as ctx:
        assert client.get(url).status_code == 200
    first = len(ctx.captured_queries)
    for _ in range(5):
        factory(world.acme, world.acme_source)
    client.get(url)  # warm again (budgets: the new rows' spend counters)
    with django_assert_num_queries(first):
        assert client.get(url).status_code == 200


# Session, user, memberships, tenant filter, counts, Django perms, the page: pinned so an N+1 fails here.
CHANGELIST_QUERIES = {
    "/admin/keys/apikey/": 9,
    "/admin/keys/source/": 9,
    "/admin/billing/budget/": 9,
    "/admin/keys/membership/": 9,
    "/admin/keys/auditlog/": 12,  # + the `via` filter
    "/admin/analytics/usageevent/": 10,
}


def test_adding_an_existing_user_never_changes_their_password(client, world):
    login(client, world.acme_admin)
    client.post("/admin/keys/membership/add/", {"tenant": world.acme.pk, "username": "root",
                                                "email": "evil@acme.test", "password": "hijacked-pass",
                                                "role": "viewer"})
    world.root.refresh_from_db()
    assert not world.root.check_password("hijacked-pass")
    assert world.root.email != "evil@acme.test"


def test_admins_cannot_remove_an_owner(client, world):
    owner = Membership.objects.get(user=world.acme_owner)
    login(client, world.acme_admin)
    assert client.post(f"/admin/keys/membership/{owner.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Membership.objects.filter(pk=owner.pk).exists()
