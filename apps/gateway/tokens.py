"""Token estimates, used where a provider reports no usage and for admission upper bounds."""

from __future__ import annotations

import math


def text_of(content) -> str:
    """The text of an OpenAI message content (a string or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def estimate_text(text: str) -> int:
    """About four characters a token, as OpenAI's rule of thumb; at least one for non-empty text."""
    return math.ceil(len(text) / 4) if text else 0


def estimate_messages(messages: list[dict]) -> int:
    return sum(estimate_text(text_of(m.get("content"))) + 3 for m in messages) + 3


def prompt_bytes(messages: list[dict]) -> int:
    """UTF-8 bytes of the prompt: an upper bound of its tokens for every tokenizer in use."""
    return sum(len(text_of(m.get("content")).encode()) + len(m.get("role", "")) + 4 for m in messages) + 8
