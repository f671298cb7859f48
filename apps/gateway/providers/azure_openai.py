"""Azure OpenAI: the OpenAI wire format under `{api_base}/openai/deployments/{deployment}/...`,
the `api-version` query parameter and the `api-key` header. The deployment's upstream model is
the Azure *deployment name*; the body carries no `model`.

Azure streams may open with a chunk that has no choices (only `prompt_filter_results`); it is
dropped, since it carries nothing the OpenAI shape knows. Usage is OpenAI's, parsed by the OpenAI
wire format's parser (`openai_compatible.usage_of`).
"""

from __future__ import annotations

from urllib.parse import quote

from .base import Completion, Target, register
from .openai_compatible import OpenAICompatibleAdapter

DEFAULT_API_VERSION = "2024-10-21"


@register
class AzureOpenAIAdapter(OpenAICompatibleAdapter):
    kind = "azure_openai"

    def headers(self, target: Target) -> dict:
        headers = {"content-type": "application/json"}
        if target.secret:
            headers["api-key"] = target.secret
        return headers

    def params(self, target: Target) -> dict:
        return {"api-version": str(target.options.get("api_version") or DEFAULT_API_VERSION)}

    def url(self, target: Target, path: str) -> str:
        deployment = quote(target.upstream_model, safe="")
        return f"{target.api_base.rstrip('/')}/openai/deployments/{deployment}{path}"

    @staticmethod
    def _body(body: dict) -> dict:
        return {k: v for k, v in body.items() if k != "model"}

    async def complete(self, target: Target, body: dict) -> Completion:
        completion = await super().complete(target, self._body(body))
        completion.body.setdefault("model", target.upstream_model)
        return completion

    async def stream(self, target: Target, body: dict):
        async for chunk in super().stream(target, self._body(body)):
            if not chunk.get("choices") and not chunk.get("usage"):
                continue
            yield chunk

    async def embed(self, target: Target, body: dict) -> Completion:
        return await super().embed(target, self._body(body))
