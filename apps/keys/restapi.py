"""Plumbing every management-API (`/api/`, DRF) view shares: the error shape and the one exception
handler, input hygiene (control characters) and pagination bounds. The schema class that documents
the error responses is in `restschema.py` (it imports DRF's generics, which import this module's
pagination through the settings).

Error shape (DRF's own): `{"detail": "..."}`, or for invalid input `{"<field>": ["...", ...]}`
(`non_field_errors` for the object as a whole). A 409 adds `blocked_by`: {model name: count}.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import orjson
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError
from django.db.models import ProtectedError, RestrictedError
from django.http import JsonResponse
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

API_PREFIX = "/api/"

# Control characters the database refuses (NUL) or that have no business in a name, a slug or a
# query: all of C0, DEL and C1, and lone surrogates (not encodable as UTF-8). Bodies may keep tab,
# LF and CR (free text such as descriptions); URLs and query strings may not.
_BAD_IN_URL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_IN_BODY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
CONTROL_CHARACTERS_MESSAGE = "Control characters (such as NUL) are not allowed in {where}."


def _strings(value) -> Iterator[str]:
    """Every string in a parsed JSON or form value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def control_characters_in(request) -> str | None:
    """Where the request carries a refused control character (`path`, `query string`, `body`), or None."""
    if _BAD_IN_URL.search(request.path):
        return "the path"
    for k, values in request.GET.lists():
        if _BAD_IN_URL.search(k) or any(_BAD_IN_URL.search(v) for v in values):
            return "the query string"
    if request.method in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return None
    content_type = request.content_type or ""
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            # Read the body once here; Django keeps it, so DRF parses it again from memory.
            data = orjson.loads(request.body) if request.body else None
        except orjson.JSONDecodeError:
            # Invalid JSON, possibly because of a lone surrogate: DRF's parser decides (400).
            data = None
        strings = _strings(data)
    elif content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        request.body  # noqa: B018 - keep the raw body so DRF can read it after request.POST
        strings = (s for k, vs in request.POST.lists() for s in (k, *vs))
    else:
        return None
    if any(_BAD_IN_BODY.search(s) for s in strings):
        return "the body"
    return None


# Django's own answers on /api/ (an unmatched URL, an unreadable request), in the API's shape.
_DJANGO_ERRORS = {400: "Bad request.", 403: "Forbidden.", 404: "Not found.", 405: "Method not allowed.",
                  413: "Request body too large.", 500: "Server error."}


class ApiInputMiddleware:
    """Refuses, with a 400 in the API's error shape, any /api/ request with a control character in
    its path, query string or body strings: one check for every view, serializer and URL, before
    anything reaches the database (PostgreSQL refuses NUL in text with an error). Django's own HTML
    error pages on /api/ (e.g. a 404 for a URL no route matches) become `{"detail": ...}` JSON."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.path.startswith(API_PREFIX):
            return self.get_response(request)
        try:
            where = control_characters_in(request)
        except RequestDataTooBig:
            return JsonResponse({"detail": _DJANGO_ERRORS[413]}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        if where is not None:
            return JsonResponse({"detail": CONTROL_CHARACTERS_MESSAGE.format(where=where)},
                                status=status.HTTP_400_BAD_REQUEST)
        response = self.get_response(request)
        if response.status_code >= 400 and response.get("Content-Type", "").startswith("text/html"):
            detail = _DJANGO_ERRORS.get(response.status_code, "Request failed.")
            new = JsonResponse({"detail": detail}, status=response.status_code)
            if response.has_header("Allow"):
                new["Allow"] = response["Allow"]
            return new
        return response


def _blocked_by(objects) -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in objects:
        name = obj._meta.model_name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def api_exception_handler(exc, context):
    """DRF's handler, plus the database's and the domain's refusals as client errors, never a 500:
    a delete blocked by protected rows is a 409 naming what blocks it; Django's ValidationError is a
    400; a value the database refuses (out of range, invalid) a 400; a uniqueness race a 409."""
    if isinstance(exc, ProtectedError | RestrictedError):
        objects = exc.protected_objects if isinstance(exc, ProtectedError) else exc.restricted_objects
        blocked = _blocked_by(objects)
        set_rollback()
        names = ", ".join(f"{n} {k}" for k, n in blocked.items())
        return Response({"detail": f"Cannot delete: still referred to by {names}. Delete or move those first.",
                         "blocked_by": blocked}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, DjangoValidationError):
        exc = ValidationError(exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages})
    elif isinstance(exc, DataError):
        set_rollback()
        return Response({"detail": "A value is out of range or invalid."}, status=status.HTTP_400_BAD_REQUEST)
    elif isinstance(exc, IntegrityError):
        set_rollback()
        return Response({"detail": "This conflicts with an existing object."}, status=status.HTTP_409_CONFLICT)
    return exception_handler(exc, context)


# --- pagination ------------------------------------------------------------------------------

MAX_OFFSET = 2**63 - 1  # PostgreSQL's bigint: OFFSET beyond it is a database error


class ApiPagination(LimitOffsetPagination):
    """DRF's limit/offset pagination with bounds: `limit` 1..1000 (a larger value is clamped to
    1000), `offset` 0..2**63-1 (larger: 400)."""

    default_limit = 100
    max_limit = 1000

    def get_offset(self, request):
        raw = request.query_params.get(self.offset_query_param)
        try:
            if raw is not None and int(raw) > MAX_OFFSET:
                raise ValidationError({self.offset_query_param: [f"Ensure this value is at most {MAX_OFFSET}."]})
        except ValueError:
            pass
        return super().get_offset(request)

    def get_schema_operation_parameters(self, view):
        params = super().get_schema_operation_parameters(view)
        for p in params:
            if p["name"] == self.limit_query_param:
                p["schema"].update(minimum=1, maximum=self.max_limit)
                p["description"] += f" (1 to {self.max_limit}; larger values are clamped to {self.max_limit})."
            elif p["name"] == self.offset_query_param:
                p["schema"].update(minimum=0, maximum=MAX_OFFSET)
        return params
