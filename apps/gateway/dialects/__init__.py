"""Inbound dialects: other APIs a client may speak to the gateway, each translated into the one
chat GatewayRequest the pipeline runs (same bounds, cache key, limits, holds and ledger), and each
answer translated back. `anthropic_messages` is Anthropic's Messages API (`POST /v1/messages`),
`openai_responses` OpenAI's Responses API (`POST /v1/responses`).

Our own request fields (the seed's metadata, cache and async options) ride in `x-gateway-*`
headers, which every dialect accepts (`gateway_options`), or in the dialect's own `metadata`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import invalid_request

# header -> (where it goes in our options, how it is read)
GATEWAY_HEADERS = {
    "x-gateway-budget-id": ("metadata", "budget_id", str),
    "x-gateway-source-id": ("metadata", "source_id", str),
    "x-gateway-source-type": ("metadata", "source_type", str),
    "x-gateway-priority": ("metadata", "priority", int),
    "x-gateway-cache": ("", "cache", bool),
    "x-gateway-async": ("", "async", bool),
    "x-gateway-callback-url": ("", "callback_url", str),
}
METADATA_FIELDS = ("budget_id", "source_id", "source_type", "priority")
OPTION_FIELDS = ("cache", "async", "callback_url")


def _read(header: str, value: str, how):
    if how is bool:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise invalid_request(f"Invalid value for header '{header}': must be true or false.", param=header)
    if how is int:
        try:
            return int(value)
        except ValueError:
            raise invalid_request(f"Invalid value for header '{header}': must be an integer.", param=header)
    return value


def gateway_options(headers: Mapping[str, str], metadata: dict | None) -> dict:
    """Our fields from the `x-gateway-*` headers and the dialect's `metadata` (headers win), as the
    top-level fields of a chat body (`metadata`, `cache`, `async`, `callback_url`)."""
    out: dict = {}
    meta: dict = {}
    for name, value in (metadata or {}).items():
        if name in METADATA_FIELDS:
            meta[name] = int(value) if name == "priority" and isinstance(value, str) and value.isdigit() else value
        elif name in OPTION_FIELDS:
            out[name] = value.lower() == "true" if isinstance(value, str) and name != "callback_url" else value
    for header, (where, name, how) in GATEWAY_HEADERS.items():
        value = headers.get(header)
        if value is None:
            continue
        (meta if where == "metadata" else out)[name] = _read(header, value.strip(), how)
    if meta:
        out["metadata"] = meta
    return out


def bearer(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer`, else Anthropic's `x-api-key`, as the pipeline's authorization."""
    authorization = headers.get("authorization")
    if authorization:
        return authorization
    key = headers.get("x-api-key")
    return f"Bearer {key}" if key else None
