"""Token estimates, used where a provider reports no usage and for admission upper bounds."""

from __future__ import annotations

import math

import orjson


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


# The most prompt tokens one image part may count: gpt-4o-mini bills a high-detail image as up to
# about 48,000 tokens (2,833 + 5,667 per 512 px tile); other models count far fewer.
IMAGE_TOKENS_MAX = 50_000
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def prompt_bytes(messages: list[dict], extra: list | None = None) -> int:
    """An upper bound of the prompt's tokens for every tokenizer in use: the UTF-8 bytes of the
    messages as JSON (text, tool calls, names), of `extra` (tool and function definitions, a
    response_format schema), and IMAGE_TOKENS_MAX for each image part (an image URL is short)."""
    images = sum(1 for m in messages if isinstance(m.get("content"), list)
                 for p in m["content"] if isinstance(p, dict) and p.get("type") in _IMAGE_PARTS)
    return len(orjson.dumps(messages)) + (len(orjson.dumps(extra)) if extra else 0) + images * IMAGE_TOKENS_MAX + 8
