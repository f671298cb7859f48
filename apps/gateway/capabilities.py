"""What an alias can do (chat, embeddings), when its config does not say.

An alias's `supports_embeddings` / `supports_chat` left empty (None) are inferred from its
deployments' upstream models and then its own name: genai-prices' model data first (a model priced
for input tokens only is an embedding model), then the name (`text-embedding-*`, `*-embed-*`,
`*-embedding-*`). An embedding model does not chat; anything not known as one chats and does not
embed (the defaults before inference existed). A value set in the config or the admin wins.
"""

from __future__ import annotations

import re
from functools import lru_cache

from apps.billing.genai import genai_model_is_embedding

_EMBEDDING_NAME = re.compile(r"(?:^|[-_/.:])embed(?:ding)?s?(?:[-_/.:@]|$)", re.IGNORECASE)


@lru_cache(maxsize=4096)
def model_is_embedding(name: str, kind: str | None = None) -> bool | None:
    """True/False when the price data or the name tells, None when neither does."""
    known = genai_model_is_embedding(name=name, kind=kind)
    if known is not None:
        return known
    if _EMBEDDING_NAME.search(name or ""):
        return True
    return None


def alias_capabilities(*, alias: str, models: list[tuple[str, str | None]], supports_embeddings: bool | None,
                       supports_chat: bool | None) -> tuple[bool, bool]:
    """(supports_embeddings, supports_chat): the set values, the rest inferred from `models`
    ((upstream model, provider kind) of the deployments), then from the alias name."""
    embedding = None
    for name, kind in [*models, (alias, None)]:
        embedding = model_is_embedding(name, kind if kind != "mock" else None)
        if embedding is not None:
            break
    embedding = bool(embedding)
    return (embedding if supports_embeddings is None else supports_embeddings,
            (not embedding) if supports_chat is None else supports_chat)
