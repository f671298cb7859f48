"""Password logins under django-axes: the lockout audit row and DRF's HTTP Basic answer.

Axes (settings: AXES_*) counts failed logins of every path that calls Django's `authenticate()`
with the request (the admin, /accounts/login/, HTTP Basic on /api/) by username and by client
address, and refuses either one, right password or not, until the cool-off has passed.

- Each lockout leaves one audit row, `login_lockout` (actor system), when it begins; attempts
  refused during it are not audited again (they do not extend it either).
- DRF's BasicAuthentication answers 401 "Invalid username/password" when `authenticate()` returns
  None, which it also does for a locked-out login: `BasicAuthentication` here answers 429 with the
  lockout message instead, so a client knows that retrying is pointless.
"""

from __future__ import annotations

from axes.helpers import get_cool_off, get_failure_limit, get_lockout_message
from axes.signals import user_locked_out
from django.dispatch import receiver
from drf_spectacular.authentication import BasicScheme
from rest_framework import authentication, exceptions, status

from .services import security_event_record


class LoginLockedOut(exceptions.APIException):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "login_locked_out"


class BasicAuthentication(authentication.BasicAuthentication):
    """DRF's HTTP Basic (it calls `authenticate(request=...)`, so axes counts it), with 429 while
    the username or the client address is locked out."""

    def authenticate_credentials(self, userid, password, request=None):
        try:
            return super().authenticate_credentials(userid, password, request)
        except exceptions.AuthenticationFailed:
            if request is not None and getattr(request, "axes_locked_out", False):
                locked = LoginLockedOut(str(get_lockout_message()))
                cool_off = get_cool_off(request)
                locked.wait = int(cool_off.total_seconds()) if cool_off else None  # DRF: Retry-After (at most)
                raise locked from None
            raise


class _BasicScheme(BasicScheme):
    """The OpenAPI schema describes it as HTTP Basic (drf-spectacular registers it by subclassing)."""

    target_class = "apps.keys.logins.BasicAuthentication"


@receiver(user_locked_out, dispatch_uid="keys.login_lockout_audit")
def login_lockout_audit(sender, request, username, ip_address, **kwargs) -> None:
    """One audit row when a lockout begins. Axes sends this signal for the failure that reaches the
    limit (it then has counted `axes_failures_since_start`) and again for every attempt refused
    during the lockout (not counted): only the first is recorded."""
    failures = getattr(request, "axes_failures_since_start", None)
    if failures is None:
        return
    cool_off = get_cool_off(request)
    security_event_record(
        action="login_lockout", object_type="user", object_id=(username or "")[:64],
        details={"username": username or "", "client_ip": ip_address or "",
                 "path": getattr(request, "axes_path_info", "") or "", "failures": failures,
                 "failure_limit": get_failure_limit(request, None),
                 "cool_off_s": int(cool_off.total_seconds()) if cool_off else None},
    )
