"""OpenAI itself (api.openai.com conventions): the OpenAI wire format, bearer auth, and the
optional `OpenAI-Organization` / `OpenAI-Project` headers from the provider's options. Usage is
parsed by the OpenAI wire format's parser (`openai_compatible.usage_of`)."""

from __future__ import annotations

from .base import Target, register
from .openai_compatible import OpenAICompatibleAdapter

DEFAULT_API_BASE = "https://api.openai.com/v1"


@register
class OpenAIAdapter(OpenAICompatibleAdapter):
    kind = "openai"

    def headers(self, target: Target) -> dict:
        headers = super().headers(target)
        if target.options.get("organization"):
            headers["openai-organization"] = str(target.options["organization"])
        if target.options.get("project"):
            headers["openai-project"] = str(target.options["project"])
        return headers

    def url(self, target: Target, path: str) -> str:
        return (target.api_base or DEFAULT_API_BASE).rstrip("/") + path
