"""Single sign-on with OpenID Connect (mozilla-django-oidc), on when settings.OIDC_ISSUER is set.

Flow: the login page's "Sign in with SSO" goes to /oidc/authenticate/ (state, nonce, PKCE, then a
redirect to the provider), the provider sends the browser back to /oidc/callback/ with a code, the
backend exchanges it for tokens, verifies the id_token (signature from the provider's JWKS, issuer,
audience, expiry, nonce), reads the claims (id_token and userinfo) and hands them to
`services.sso_user_login`, which provisions the user and makes the memberships match the tenant
claim (`OIDC_TENANT_CLAIM`, values `tenant:role`).

The provider's endpoints come from its discovery document, fetched on first use and kept
OIDC_DISCOVERY_TTL_S in process (no network at import or startup), unless they are set
explicitly. The backend is built by Django for every request's get_user(): it reads nothing from
the network until a login actually happens.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import jwt
import requests
from django.conf import settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth import views as auth_views
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.http import Http404, HttpResponseRedirect
from django.urls import reverse
from django.utils.http import urlencode
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.utils import import_from_settings
from mozilla_django_oidc.views import OIDCAuthenticationCallbackView, OIDCAuthenticationRequestView

from apps.core.caches import on_reset

from . import services
from .models import Role

log = logging.getLogger(__name__)

# --- discovery ------------------------------------------------------------------------------------

# settings name -> discovery document field
_ENDPOINTS = {
    "OIDC_OP_AUTHORIZATION_ENDPOINT": "authorization_endpoint",
    "OIDC_OP_TOKEN_ENDPOINT": "token_endpoint",
    "OIDC_OP_USER_ENDPOINT": "userinfo_endpoint",
    "OIDC_OP_JWKS_ENDPOINT": "jwks_uri",
}
_discovery: dict = {}
_discovery_lock = threading.Lock()


def _same_issuer(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def discovery_document() -> dict:
    """The issuer's /.well-known/openid-configuration, cached in process OIDC_DISCOVERY_TTL_S.
    Raises requests.RequestException (provider unreachable) or ImproperlyConfigured (a document
    naming another issuer)."""
    issuer = settings.OIDC_ISSUER
    with _discovery_lock:
        cached = _discovery.get(issuer)
        if cached and time.monotonic() - cached[0] < settings.OIDC_DISCOVERY_TTL_S:
            return cached[1]
        response = requests.get(f"{issuer.rstrip('/')}/.well-known/openid-configuration",
                                timeout=settings.OIDC_TIMEOUT)
        response.raise_for_status()
        doc = response.json()
        if not _same_issuer(str(doc.get("issuer", "")), issuer):
            raise ImproperlyConfigured(f"OIDC discovery: the document names issuer {doc.get('issuer')!r}, "
                                       f"not OIDC_ISSUER {issuer!r}")
        _discovery[issuer] = (time.monotonic(), doc)
        return doc


@on_reset
def discovery_reset() -> None:
    with _discovery_lock:
        _discovery.clear()


def oidc_setting(attr: str, *default):
    """mozilla-django-oidc's settings lookup, with the provider endpoints taken from discovery
    when not set explicitly."""
    if attr in _ENDPOINTS:
        explicit = getattr(settings, attr, "")
        if explicit:
            return explicit
        value = discovery_document().get(_ENDPOINTS[attr], "")
        if not value and attr != "OIDC_OP_USER_ENDPOINT":  # userinfo is optional
            raise ImproperlyConfigured(f"OIDC discovery: the provider publishes no {_ENDPOINTS[attr]}")
        return value
    return import_from_settings(attr, *default)


# --- claims -----------------------------------------------------------------------------------------

_ROLE_RANK = {Role.VIEWER: 0, Role.MANAGER: 1, Role.ADMIN: 2, Role.OWNER: 3}


@dataclass(frozen=True)
class Grants:
    """What the tenant claim says: {tenant slug: role}, whether it names the superuser value, and
    the values it could not read."""

    roles: dict[str, str] = field(default_factory=dict)
    superuser: bool = False
    invalid: tuple[str, ...] = ()


def claim_values(raw) -> list[str]:
    """A claim as a list of strings: providers send a JSON list, some a space- or comma-separated
    string."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [v for v in raw.replace(",", " ").split() if v]
    if isinstance(raw, list | tuple):
        return [v for v in raw if isinstance(v, str)]
    return []


def grants_from_claim(values: list[str], *, superuser_value: str = "") -> Grants:
    """Read `tenant:role` values (e.g. `acme:manager`). A tenant listed twice gets the higher role;
    values of another shape or with an unknown role are returned as invalid (other groups of the
    provider are common and harmless)."""
    roles: dict[str, str] = {}
    invalid: list[str] = []
    superuser = False
    for value in values:
        if superuser_value and value == superuser_value:
            superuser = True
            continue
        slug, sep, role = value.strip().rpartition(":")
        slug, role = slug.strip(), role.strip().lower()
        if not sep or not slug or role not in _ROLE_RANK:
            invalid.append(value)
            continue
        if slug not in roles or _ROLE_RANK[role] > _ROLE_RANK[roles[slug]]:
            roles[slug] = role
    return Grants(roles=roles, superuser=superuser, invalid=tuple(invalid))


# --- the authentication backend -------------------------------------------------------------------


class TenantOIDCBackend(OIDCAuthenticationBackend):
    """mozilla-django-oidc's backend with: endpoints from discovery (lazily), strict id_token
    checks (issuer and audience too, which the library leaves out), users found by (issuer, sub),
    memberships from the tenant claim, and refusals logged and audited."""

    get_settings = staticmethod(oidc_setting)
    OIDC_RP_IDP_SIGN_KEY = None

    def __init__(self, *args, **kwargs):
        # No settings checks and no network here: Django builds a backend for every get_user().
        self.UserModel = get_user_model()

    OIDC_OP_TOKEN_ENDPOINT = property(lambda self: oidc_setting("OIDC_OP_TOKEN_ENDPOINT"))
    OIDC_OP_USER_ENDPOINT = property(lambda self: oidc_setting("OIDC_OP_USER_ENDPOINT"))
    OIDC_OP_JWKS_ENDPOINT = property(lambda self: oidc_setting("OIDC_OP_JWKS_ENDPOINT"))
    OIDC_RP_CLIENT_ID = property(lambda self: settings.OIDC_RP_CLIENT_ID)
    OIDC_RP_CLIENT_SECRET = property(lambda self: settings.OIDC_RP_CLIENT_SECRET)
    OIDC_RP_SIGN_ALGO = property(lambda self: settings.OIDC_RP_SIGN_ALGO)

    def authenticate(self, request, **kwargs):
        # Only the callback view passes a nonce: a password login never reaches the provider.
        if not settings.SSO_ENABLED or request is None or "nonce" not in kwargs:
            return None
        try:
            return super().authenticate(request, **kwargs)
        except (SuspiciousOperation, jwt.PyJWTError, requests.RequestException, ImproperlyConfigured,
                KeyError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("SSO login refused: %s", reason)
            services.security_event_record(action="sso_login_refused", object_type="user",
                                           details={"issuer": settings.OIDC_ISSUER, "reason": reason})
            return None

    def _verify_jws(self, payload, key):
        """Signature, algorithm, expiry, audience (our client id) and issuer of a signed token."""
        alg = jwt.get_unverified_header(payload).get("alg")
        if alg != self.OIDC_RP_SIGN_ALGO:
            raise SuspiciousOperation(f"id_token algorithm {alg!r} is not OIDC_SIGN_ALGO {self.OIDC_RP_SIGN_ALGO!r}")
        try:
            claims = jwt.decode(payload, key, algorithms=[alg], audience=self.OIDC_RP_CLIENT_ID,
                                options={"require": ["iss", "aud", "exp", "sub"]}, leeway=30)
        except jwt.PyJWTError as exc:
            raise SuspiciousOperation(f"id_token refused: {exc}")
        if not _same_issuer(str(claims["iss"]), settings.OIDC_ISSUER):
            raise SuspiciousOperation(f"id_token refused: issuer {claims['iss']!r} is not OIDC_ISSUER")
        return claims

    def get_userinfo(self, access_token, id_token, payload):
        if not self.OIDC_OP_USER_ENDPOINT:
            return {}
        return super().get_userinfo(access_token, id_token, payload)

    def get_or_create_user(self, access_token, id_token, payload):
        userinfo = self.get_userinfo(access_token, id_token, payload)
        if userinfo.get("sub", payload["sub"]) != payload["sub"]:
            raise SuspiciousOperation("userinfo names another subject than the id_token")
        claims = {**payload, **userinfo, "iss": payload["iss"], "sub": payload["sub"]}
        grants = grants_from_claim(claim_values(claims.get(settings.OIDC_TENANT_CLAIM)),
                                   superuser_value=settings.OIDC_SUPERUSER_VALUE)
        if grants.invalid:
            log.info("SSO: %s values not of the form tenant:role ignored: %s", settings.OIDC_TENANT_CLAIM,
                     ", ".join(grants.invalid))
        email = str(claims.get("email") or "")
        result = services.sso_user_login(
            issuer=settings.OIDC_ISSUER, subject=str(payload["sub"]), email=email,
            email_verified=claims.get("email_verified") is True,
            username_hint=str(claims.get("preferred_username") or email or ""),
            tenant_roles=grants.roles,
            superuser=grants.superuser if settings.OIDC_SUPERUSER_VALUE else None,
        )
        for slug in result.unknown_tenants:
            log.warning("SSO: %s names unknown tenant %r for %s (ignored)", settings.OIDC_TENANT_CLAIM, slug,
                        result.user.get_username())
        return result.user

    def get_user(self, user_id):
        # Django's rule (an inactive user's session ends), which the library's get_user skips.
        return ModelBackend.get_user(self, user_id)


# --- views ------------------------------------------------------------------------------------------


def _failure_redirect() -> HttpResponseRedirect:
    return HttpResponseRedirect(settings.LOGIN_REDIRECT_URL_FAILURE)


class SsoAuthenticateView(OIDCAuthenticationRequestView):
    """/oidc/authenticate/: state, nonce and PKCE into the session, then off to the provider."""

    get_settings = staticmethod(oidc_setting)

    def __init__(self, *args, **kwargs):
        super(OIDCAuthenticationRequestView, self).__init__(*args, **kwargs)  # endpoints read in get()

    def get(self, request):
        if not settings.SSO_ENABLED:
            raise Http404("Single sign-on is not configured.")
        try:
            self.OIDC_OP_AUTH_ENDPOINT = oidc_setting("OIDC_OP_AUTHORIZATION_ENDPOINT")
        except (requests.RequestException, ImproperlyConfigured, ValueError) as exc:
            log.error("SSO: the identity provider cannot be reached or is misconfigured: %s", exc)
            return _failure_redirect()
        self.OIDC_RP_CLIENT_ID = settings.OIDC_RP_CLIENT_ID
        return super().get(request)


class SsoCallbackView(OIDCAuthenticationCallbackView):
    """/oidc/callback/: the provider sends the browser back here with a code."""

    get_settings = staticmethod(oidc_setting)

    def get(self, request):
        if not settings.SSO_ENABLED:
            raise Http404("Single sign-on is not configured.")
        return super().get(request)


class LoginView(auth_views.LoginView):
    """/accounts/login/: Django's login, plus "Sign in with SSO" when SSO is on. With password
    login switched off the page offers SSO only and a posted password is refused."""

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), **login_context(self.request)}

    def post(self, request, *args, **kwargs):
        if not settings.PASSWORD_LOGIN_ENABLED:
            context = self.get_context_data(password_refused=True)
            return self.render_to_response(context, status=403)
        return super().post(request, *args, **kwargs)


def login_context(request) -> dict:
    return {"sso_enabled": settings.SSO_ENABLED, "password_login_enabled": settings.PASSWORD_LOGIN_ENABLED,
            "sso_error": "sso_error" in request.GET}


def admin_login(request, extra_context=None):
    """/admin/login/: the admin's own login page (with an SSO link when SSO is on), or, with
    password login switched off, the SSO login page."""
    if not settings.PASSWORD_LOGIN_ENABLED:
        target = request.GET.get("next") or reverse("admin:index")
        return HttpResponseRedirect(f"{reverse('login')}?{urlencode({'next': target})}")
    return admin.site.login(request, extra_context={**(extra_context or {}), **login_context(request)})
