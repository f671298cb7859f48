"""Middleware for the data plane."""

from __future__ import annotations

import re

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import RequestDataTooBig

from .errors import GatewayError
from .pipeline import new_request_id

# Django's own (HTML) error pages on /v1, answered in OpenAI's error shape instead.
_HTML_ERRORS = {
    400: ("The request could not be read.", "invalid_request_error", None),
    403: ("Forbidden.", "permission_error", None),
    405: ("Method {method} is not allowed on {path}.", "invalid_request_error", "method_not_allowed"),
    413: ("The request body is too large.", "invalid_request_error", "request_too_large"),
    500: ("The server had an error while processing your request.", "api_error", None),
}


# C0 controls (NUL, which PostgreSQL refuses in text, among them), DEL, C1 and lone surrogates:
# nothing a /v1 path or query string may carry (ids, cursors, budget ids are plain text).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def control_characters(request) -> GatewayError | None:
    """A 400 naming where a /v1 request's path or query string carries a control character, or
    None. Checked once, here, before any view (and so before any database access)."""
    if _CONTROL.search(request.path):
        return GatewayError(400, "Control characters (such as NUL) are not allowed in the path.",
                            code="invalid_characters")
    if request.META.get("QUERY_STRING"):
        for name, values in request.GET.lists():
            if _CONTROL.search(name) or any(_CONTROL.search(v) for v in values):
                return GatewayError(400, f"Control characters (such as NUL) are not allowed in the query "
                                         f"parameter '{name}'.", code="invalid_characters", param=name)
    return None


def _openai_error(request, response):
    status = response.status_code
    if status == 404:
        return GatewayError(404, f"Unknown path {request.path}.", code="unknown_url").response()
    message, type_, code = _HTML_ERRORS.get(status, ("The request failed.", "api_error" if status >= 500
                                                      else "invalid_request_error", None))
    new = GatewayError(status, message.format(method=request.method, path=request.path), type=type_,
                       code=code).response()
    if response.has_header("Allow"):
        new["Allow"] = response["Allow"]
    return new


class RequestIdMiddleware:
    """Every response carries `x-request-id`; /v1 errors that Django or Ninja render themselves
    (unknown path, method not allowed, body too large, server error) answer in OpenAI's shape; a
    /v1 path or query string with a control character is a 400 before any view runs."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _finish(self, request, response):
        if response.status_code >= 400 and request.path.startswith("/v1/") and \
                response.get("content-type", "").startswith("text/html"):
            response = _openai_error(request, response)
        if "x-request-id" not in response:
            response["x-request-id"] = new_request_id()
        # What SecurityMiddleware would add; the data plane runs without it (config/asgi.py).
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        refused = self._refuse(request)
        return self._finish(request, refused or self.get_response(request))

    async def _acall(self, request):
        refused = self._refuse(request)
        return self._finish(request, refused or await self.get_response(request))

    @staticmethod
    def _refuse(request):
        if not request.path.startswith("/v1/"):
            return None
        problem = control_characters(request)
        return problem.response() if problem is not None else None

    def process_exception(self, request, exception):
        if isinstance(exception, RequestDataTooBig) and request.path.startswith("/v1/"):
            return GatewayError(413, f"The request body is too large (at most {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} "
                                     "bytes).", code="request_too_large").response()
        return None
