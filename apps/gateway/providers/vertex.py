"""Google Vertex AI: Gemini models and Anthropic's Claude models in a Google Cloud project,
authenticated with a service account (google-auth), translated to and from the OpenAI shape.

Endpoint: `https://{location}-aiplatform.googleapis.com/v1/projects/{project}/locations/{location}/
publishers/{publisher}/models/{model}:{method}` (`https://aiplatform.googleapis.com` for the
`global` location); `api_base` overrides the host (a private endpoint, a fake). The project is the
provider option `project` (else the service account's `project_id`), the location the deployment's
`region`, else the option `location`, else `us-central1`.
Publisher: `anthropic` for models whose id starts with `claude` (or the option `publisher`),
else `google`. Gemini models use `:generateContent` / `:streamGenerateContent?alt=sse` with the
Gemini adapter's wire format and usage parser; Claude models use `:rawPredict` /
`:streamRawPredict` with Anthropic's Messages format (`model` moves to the URL, the body carries
`anthropic_version: vertex-2023-10-16`) and the Anthropic adapter's usage parser; a Messages API
client's body reaches a Claude model nearly unchanged, as with the `anthropic` kind.
Credentials: the provider's secret is the service account's JSON key (stored encrypted); without
one, Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, the metadata server). The
OAuth access token is cached until shortly before it expires and refreshed in a thread
(google-auth's transport is blocking); it is sent as `Authorization: Bearer` and scrubbed from
error messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import replace
from urllib.parse import quote

import orjson

from .anthropic import AnthropicAdapter
from .base import Completion, ProviderAdapter, ProviderError, Target, register
from .gemini import GeminiAdapter

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
DEFAULT_LOCATION = "us-central1"
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"

_credentials: dict[str, object] = {}
_lock = threading.Lock()


def _build(secret: str):
    import google.auth
    from google.oauth2 import service_account

    if not secret:
        creds, _project = google.auth.default(scopes=list(SCOPES))
        return creds
    try:
        info = orjson.loads(secret)
    except orjson.JSONDecodeError:
        raise ProviderError("the Vertex AI credential is not a service account JSON key", status=500,
                            code="provider_misconfigured")
    try:
        return service_account.Credentials.from_service_account_info(info, scopes=list(SCOPES))
    except (ValueError, KeyError) as exc:
        raise ProviderError(f"the Vertex AI service account key is not usable ({exc})", status=500,
                            code="provider_misconfigured")


def _token(secret: str) -> str:
    """A valid access token for this secret (blocking: run in a thread)."""
    import google.auth.exceptions
    import google.auth.transport.requests

    key = hashlib.sha256(secret.encode()).hexdigest()
    with _lock:
        creds = _credentials.get(key)
        if creds is None:
            creds = _credentials[key] = _build(secret)
        if not creds.valid:  # also false shortly before expiry
            try:
                creds.refresh(google.auth.transport.requests.Request())
            except google.auth.exceptions.GoogleAuthError as exc:
                raise ProviderError(f"Vertex AI authentication failed: {type(exc).__name__}: {exc}"[:500],
                                    status=502, retryable=False, code="upstream_auth_failed")
        return creds.token


async def access_token(target: Target) -> str:
    return await asyncio.to_thread(_token, target.secret)


def credentials_reset() -> None:
    with _lock:
        _credentials.clear()


def project_of(target: Target) -> str:
    project = str(target.options.get("project") or "")
    if not project and target.secret:
        try:
            project = str(orjson.loads(target.secret).get("project_id") or "")
        except (orjson.JSONDecodeError, AttributeError):
            project = ""
    if not project:
        raise ProviderError("the Vertex AI provider needs the option `project`", status=500,
                            code="provider_misconfigured")
    return project


def location_of(target: Target) -> str:
    return target.region or str(target.options.get("location") or "") or DEFAULT_LOCATION


def publisher_of(target: Target) -> str:
    return str(target.options.get("publisher") or "") or (
        "anthropic" if target.upstream_model.startswith("claude") else "google")


def model_url(target: Target, method: str) -> str:
    location = location_of(target)
    host = "aiplatform.googleapis.com" if location == "global" else f"{location}-aiplatform.googleapis.com"
    base = (target.api_base or f"https://{host}").rstrip("/")
    return (f"{base}/v1/projects/{quote(project_of(target), safe='')}/locations/{quote(location, safe='')}"
            f"/publishers/{publisher_of(target)}/models/{quote(target.upstream_model, safe='')}:{method}")


class _VertexGemini(GeminiAdapter):
    """The Gemini wire format at Vertex's URL, with a bearer token (in `target.secret`)."""

    def headers(self, target: Target) -> dict:
        return {"content-type": "application/json", "authorization": f"Bearer {target.secret}"}

    def url(self, target: Target, method: str) -> str:
        return model_url(target, method)


class _VertexAnthropic(AnthropicAdapter):
    supports_batch = False  # Vertex AI batch prediction is another API
    """Anthropic's Messages format at Vertex's rawPredict, with a bearer token (in `target.secret`)."""

    def headers(self, target: Target) -> dict:
        return {"content-type": "application/json", "authorization": f"Bearer {target.secret}"}

    def url(self, target: Target, *, stream: bool = False) -> str:
        return model_url(target, "streamRawPredict" if stream else "rawPredict")

    def payload(self, target: Target, req: dict) -> dict:
        body = {k: v for k, v in req.items() if k != "model"}
        body["anthropic_version"] = VERTEX_ANTHROPIC_VERSION
        return body


_gemini = _VertexGemini()
_anthropic = _VertexAnthropic()


@register
class VertexAdapter(ProviderAdapter):
    kind = "vertex"

    async def _inner(self, target: Target) -> tuple[ProviderAdapter, Target]:
        """The adapter for the model's publisher, and the target carrying the access token."""
        adapter = _anthropic if publisher_of(target) == "anthropic" else _gemini
        options = {**target.options, "project": project_of(target)}  # before the key gives way to the token
        return adapter, replace(target, secret=await access_token(target), options=options)

    def takes_native(self, target: Target) -> str:
        return "messages" if publisher_of(target) == "anthropic" else ""

    async def complete(self, target: Target, body: dict) -> Completion:
        adapter, inner = await self._inner(target)
        return await adapter.complete(inner, body)

    async def stream(self, target: Target, body: dict):
        adapter, inner = await self._inner(target)
        agen = adapter.stream(inner, body)
        try:
            async for chunk in agen:
                yield chunk
        finally:
            await agen.aclose()

    async def complete_native(self, target: Target, body: dict) -> Completion:
        adapter, inner = await self._inner(target)
        return await adapter.complete_native(inner, body)

    async def stream_native(self, target: Target, body: dict):
        adapter, inner = await self._inner(target)
        agen = adapter.stream_native(inner, body)
        try:
            async for chunk in agen:
                yield chunk
        finally:
            await agen.aclose()
