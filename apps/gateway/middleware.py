"""Middleware for the data plane."""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from .errors import GatewayError
from .pipeline import new_request_id


class RequestIdMiddleware:
    """Every response carries `x-request-id`; unknown /v1 paths answer in OpenAI's error shape."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _finish(self, request, response):
        if response.status_code == 404 and request.path.startswith("/v1/") and \
                response.get("content-type", "").startswith("text/html"):
            response = GatewayError(404, f"Unknown path {request.path}.", code="unknown_url").response()
        if "x-request-id" not in response:
            response["x-request-id"] = new_request_id()
        # What SecurityMiddleware would add; the data plane runs without it (config/asgi.py).
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        return self._finish(request, self.get_response(request))

    async def _acall(self, request):
        return self._finish(request, await self.get_response(request))
