"""The one domain error of the data plane, rendered as an OpenAI-shaped error in one place."""

from __future__ import annotations

import orjson
from django.http import HttpResponse


class GatewayError(Exception):
    """An error a client sees: HTTP status plus OpenAI's {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> HttpResponse:
        resp = HttpResponse(orjson.dumps(self.body()), status=self.status, content_type="application/json")
        for k, v in self.headers.items():
            resp[k] = v
        return resp


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def invalid_api_key(message: str = "Incorrect API key provided.") -> GatewayError:
    return GatewayError(401, message, type="invalid_request_error", code="invalid_api_key")


def permission_denied(message: str, *, code: str = "model_not_allowed", param: str | None = None) -> GatewayError:
    return GatewayError(403, message, type="permission_error", code=code, param=param)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def not_found(message: str, *, code: str = "not_found") -> GatewayError:
    return GatewayError(404, message, type="invalid_request_error", code=code)


def upstream_error(message: str, *, status: int = 502, code: str = "upstream_error") -> GatewayError:
    return GatewayError(status, message, type="api_error", code=code)


def from_param_errors(errors: list[dict]) -> GatewayError:
    """django-ninja's validation errors of path or query parameters (`?limit=null`) as one 400
    naming the first bad parameter, like a bad body field."""
    err = errors[0] if errors else {}
    loc = [str(p) for p in err.get("loc", ())]
    param = ".".join(loc[1:] if len(loc) > 1 and loc[0] in ("path", "query", "header", "body", "form", "file")
                     else loc) or None
    msg = "is required" if err.get("type") == "missing" else str(err.get("msg") or "is not valid")
    return GatewayError(400, f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}.",
                        param=param)


def from_http_error(status: int, message: str) -> GatewayError:
    """django-ninja's own HttpError (and its authentication, authorization and throttling kinds)."""
    kinds = {401: ("invalid_request_error", "invalid_api_key"), 403: ("permission_error", None),
             404: ("invalid_request_error", "not_found"), 429: ("rate_limit_error", "rate_limit_exceeded")}
    type_, code = kinds.get(status, ("api_error" if status >= 500 else "invalid_request_error", None))
    return GatewayError(status, message, type=type_, code=code)
