"""Management API tokens on /api/: `Authorization: Bearer <token>` or `Token <token>`.

The request then acts as the token's user, confined to the token's tenant and role: a copy of the
user that is never a superuser or staff, whose memberships are only {tenant: role} (for a
personal token, the lower of the token's role and the user's own role there today). Every tenant
scoping and role rule of the API reads memberships through `selectors.tenant_roles_for_user`, so
they all apply unchanged. Expired, revoked or unknown tokens get 401."""

from __future__ import annotations

import copy
from datetime import timedelta

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from . import crypto
from .models import ROLE_RANK, ManagementToken, Membership

KEYWORDS = ("bearer", "token")
_LAST_USED_EVERY = timedelta(minutes=1)


class TokenRefused(exceptions.APIException):
    """401 with `WWW-Authenticate: Bearer` (DRF would turn AuthenticationFailed into a 403 here,
    because session authentication, which has no challenge, comes first)."""

    status_code = 401
    default_code = "authentication_failed"
    auth_header = 'Bearer realm="api"'


def _refuse_save(*_args, **_kwargs):
    raise RuntimeError("a token's user is a confined copy and is never saved")


def token_user(token: ManagementToken):
    """The token's user, confined to its tenant and role (None: the token grants nothing now)."""
    user = token.user
    if not user.is_active:
        return None
    role = token.role
    if token.kind == ManagementToken.Kind.PERSONAL and not user.is_superuser:
        own = Membership.objects.filter(user=user, tenant_id=token.tenant_id).values_list("role", flat=True).first()
        if own is None:
            return None
        role = min(role, own, key=ROLE_RANK.__getitem__)
    confined = copy.copy(user)
    confined.is_superuser = False
    confined.is_staff = False
    confined._tenant_roles_cache = {token.tenant_id: role}
    confined.management_token = token
    confined.save = _refuse_save
    return confined


class ManagementTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if len(header) != 2 or header[0].decode(errors="replace").lower() not in KEYWORDS:
            return None
        try:
            secret = header[1].decode()
        except UnicodeDecodeError:
            raise TokenRefused("Invalid token.") from None
        if not secret.startswith(crypto.MANAGEMENT_TOKEN_PREFIX):
            raise TokenRefused("Invalid token: management API tokens start with "
                                                  f"{crypto.MANAGEMENT_TOKEN_PREFIX!r} (API keys are for /v1).")
        token = (ManagementToken.objects.select_related("user")
                 .filter(digest=crypto.api_key_digest(secret)).first())
        now = timezone.now()
        if token is None:
            raise TokenRefused("Invalid token.")
        if token.revoked_at is not None:
            raise TokenRefused("This token has been revoked.")
        if token.expires_at <= now:
            raise TokenRefused("This token has expired.")
        user = token_user(token)
        if user is None:
            raise TokenRefused("This token's user no longer belongs to its tenant.")
        if token.last_used_at is None or now - token.last_used_at > _LAST_USED_EVERY:
            ManagementToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return user, token

    def authenticate_header(self, request):
        return 'Bearer realm="api"'


class ManagementTokenScheme(OpenApiAuthenticationExtension):
    target_class = "apps.keys.api_tokens.ManagementTokenAuthentication"
    name = "managementToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer",
                "description": "A management API token (llmt_...), also accepted as `Token <token>`."}
