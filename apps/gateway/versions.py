"""Model versions and rollouts: what a version is, how a model name names one, and how a rollout
divides an alias's traffic between its versions.

A version of an alias is what its deployments serve: a deployment's `version` label when it has
one (`2024-08-06`), else its upstream model id (`gpt-4o-2024-08-06`). Deployments of one version
on several providers share the label. Clients pin one as `alias@version`; the bare alias follows
the rollout: each version gets its share (percent) of the traffic. An alias without shares (no
rollout ever set) routes over all its deployments by priority and weight, as before versions.

The writes (`model_rollout`, `model_rollback`, audited) are in services.py; the routing table
precomputes each alias's versions and cumulative shares (selectors.py), so picking a version on
the hot path is one random number and a bisect.
"""

from __future__ import annotations

import bisect
import random

SEPARATOR = "@"

_rng = random.Random()


def version_rng_seed(seed: int) -> None:
    """Seed the generator that picks a version for a bare alias (tests: a reproducible rollout)."""
    _rng.seed(seed)


def pinned_name(alias: str, version: str) -> str:
    return f"{alias}{SEPARATOR}{version}"


def split_pinned(model: str) -> tuple[str, str] | None:
    """`alias@version` -> (alias, version), at the first `@` (a version may hold one: Vertex ids
    such as `claude-3-5-sonnet@20240620`); None when the name pins nothing."""
    alias, sep, version = model.partition(SEPARATOR)
    if not sep or not alias or not version:
        return None
    return alias, version


class RolloutError(ValueError):
    """A rollout or rollback that cannot be done (unknown alias or version, bad share)."""


def shares_split(versions: list[str], version: str, share: int,
                 current: dict[str, int] | None = None) -> dict[str, int]:
    """The shares after giving `version` `share` percent: the other versions divide the rest in
    proportion to their current shares (equally when none of them has one), in whole percents
    (largest remainders), so the shares always sum to 100."""
    if version not in versions:
        raise RolloutError(f"unknown version {version!r} (versions: {', '.join(sorted(versions)) or 'none'})")
    if not 0 <= share <= 100:
        raise RolloutError("the share is a percentage, from 0 to 100")
    others = sorted(v for v in versions if v != version)
    rest = 100 - share
    if not others:
        if share != 100:
            raise RolloutError(f"{version!r} is the only version: it takes all the traffic (share 100)")
        return {version: 100}
    current = current or {}
    weights = [max(int(current.get(v, 0)), 0) for v in others]
    if not sum(weights):
        weights = [1] * len(others)
    total = sum(weights)
    exact = [rest * w / total for w in weights]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(others)), key=lambda i: (-(exact[i] - out[i]), others[i]))
    for i in by_remainder[: rest - sum(out)]:
        out[i] += 1
    return {version: share, **dict(zip(others, out, strict=True))}


def cumulative(shares: dict[str, int], versions) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The versions with traffic and their running share totals, for `pick`; empty when the
    alias has no rollout among `versions` (then every deployment serves the bare alias)."""
    names, bounds, total = [], [], 0
    for name in sorted(versions):
        share = int(shares.get(name, 0) or 0)
        if share > 0:
            total += share
            names.append(name)
            bounds.append(total)
    return tuple(names), tuple(bounds)


def pick(names: tuple[str, ...], bounds: tuple[int, ...]) -> str:
    """One version, drawn with the probability of its share."""
    return names[bisect.bisect_right(bounds, _rng.random() * bounds[-1])]
