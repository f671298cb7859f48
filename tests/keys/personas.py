"""Named personas for governance tests: two tenants, each with its own people and objects."""

from __future__ import annotations

from dataclasses import dataclass

from tests import factories as f


@dataclass
class World:
    acme: object
    globex: object
    root: object
    acme_owner: object
    acme_admin: object
    acme_manager: object
    acme_viewer: object
    globex_admin: object
    globex_manager: object
    acme_source: object
    globex_source: object
    acme_key: object
    globex_key: object
    acme_budget: object
    globex_budget: object


def member(tenant, role, username):
    user = f.UserFactory(username=username)
    f.MembershipFactory(user=user, tenant=tenant, role=role)
    return user


def make_world() -> World:
    acme, globex = f.TenantFactory(slug="acme", name="Acme"), f.TenantFactory(slug="globex", name="Globex")
    root = f.UserFactory(username="root", is_superuser=True)
    acme_source = f.SourceFactory(tenant=acme, name="acme-bot")
    globex_source = f.SourceFactory(tenant=globex, name="globex-etl")
    return World(
        acme=acme, globex=globex, root=root,
        acme_owner=member(acme, "owner", "ann-owner"),
        acme_admin=member(acme, "admin", "ada-admin"),
        acme_manager=member(acme, "manager", "max-manager"),
        acme_viewer=member(acme, "viewer", "vic-viewer"),
        globex_admin=member(globex, "admin", "gus-admin"),
        globex_manager=member(globex, "manager", "gil-manager"),
        acme_source=acme_source, globex_source=globex_source,
        acme_key=f.ApiKeyFactory(tenant=acme, source=acme_source, name="acme-key"),
        globex_key=f.ApiKeyFactory(tenant=globex, source=globex_source, name="globex-key"),
        acme_budget=f.BudgetFactory(tenant=acme, name="acme-monthly"),
        globex_budget=f.BudgetFactory(tenant=globex, name="globex-monthly"),
    )
