"""Provider usage payloads -> our `Usage`, under one convention that cost_compute relies on:

- `prompt_tokens` counts every input token, including those read from and written to the
  provider's prompt cache; `cached_tokens` and `cache_write_tokens` are the parts of it billed at
  their own rates (so a cached token is never billed twice, nor missed).
- `completion_tokens` counts every output token, including reasoning ("thinking") tokens;
  `reasoning_tokens` is the part of it that was reasoning (billed at the output rate).

Providers differ: OpenAI and Gemini count cached tokens inside the prompt total; Anthropic's
`input_tokens` excludes both cache reads and cache writes; Gemini's `thoughtsTokenCount` is
outside `candidatesTokenCount`. The adapters' parsing must agree with these functions (the golden
cost tests in tests/billing/test_cost_golden.py pin them).
"""

from __future__ import annotations

from apps.gateway.providers.base import Usage


def _int(data: dict | None, key: str) -> int:
    return int((data or {}).get(key) or 0)


def usage_from_openai(data: dict | None) -> Usage | None:
    """OpenAI, Azure OpenAI and OpenAI-compatible servers (incl. DeepSeek's cache hit fields)."""
    if not data:
        return None
    cached = _int(data.get("prompt_tokens_details"), "cached_tokens") or _int(data, "prompt_cache_hit_tokens")
    return Usage(
        prompt_tokens=_int(data, "prompt_tokens"),
        completion_tokens=_int(data, "completion_tokens"),
        cached_tokens=cached,
        reasoning_tokens=_int(data.get("completion_tokens_details"), "reasoning_tokens"),
    )


def usage_from_anthropic(data: dict | None) -> Usage | None:
    """Anthropic Messages `usage` (also the merged message_start + message_delta of a stream)."""
    if not data:
        return None
    read = _int(data, "cache_read_input_tokens")
    write = _int(data, "cache_creation_input_tokens")
    return Usage(
        prompt_tokens=_int(data, "input_tokens") + read + write,
        completion_tokens=_int(data, "output_tokens"),
        cached_tokens=read,
        cache_write_tokens=write,
    )


def usage_from_gemini(data: dict | None) -> Usage | None:
    """Gemini `usageMetadata`."""
    if not data:
        return None
    thoughts = _int(data, "thoughtsTokenCount")
    return Usage(
        prompt_tokens=_int(data, "promptTokenCount") + _int(data, "toolUsePromptTokenCount"),
        completion_tokens=_int(data, "candidatesTokenCount") + thoughts,
        cached_tokens=_int(data, "cachedContentTokenCount"),
        reasoning_tokens=thoughts,
    )


PARSERS = {
    "openai": usage_from_openai,
    "azure_openai": usage_from_openai,
    "openai_compatible": usage_from_openai,
    "mock": usage_from_openai,
    "anthropic": usage_from_anthropic,
    "gemini": usage_from_gemini,
}


def usage_from_provider(*, kind: str, data: dict | None) -> Usage | None:
    """The usage object of a provider kind's response, in our convention; None when it gave none."""
    return PARSERS[kind](data)
