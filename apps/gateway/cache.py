"""The response cache: exact match, always scoped to the tenant. (Pass-through until the cache
work lands; the pipeline already looks up and stores at the right places.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .providers.base import Completion

if TYPE_CHECKING:
    from .pipeline import Ctx


async def lookup(ctx: Ctx) -> Completion | None:
    return None


async def store(ctx: Ctx, completion: Completion) -> None:
    return None
