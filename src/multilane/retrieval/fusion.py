"""Reciprocal rank fusion: merge ranked lists (dense, keyword, ...) into one, by rank alone."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

DEFAULT_K = 60  # the constant of Cormack, Clarke and Buettcher (2009); larger k flattens the rank curve


@dataclass(frozen=True)
class Fused(Generic[K]):
    """A key's fused score and its 1-based rank in each input ranking (None where absent)."""

    key: K
    score: float
    ranks: tuple[int | None, ...]


def fuse(rankings: Sequence[Sequence[K]], weights: Sequence[float] | None = None,
         k: float = DEFAULT_K) -> list[Fused[K]]:
    """Fuse rankings (each best first) by weighted reciprocal rank: score = sum of weight / (k + rank).

    A key repeated within one ranking counts at its best rank there. A ranking with weight 0 adds
    nothing, and keys found only in such rankings are left out. Equal scores are ordered by the key's
    best rank in a contributing ranking, then by the earliest ranking holding it at that rank, so the
    same inputs always give the same order and keys never need to be comparable.
    """
    weight_list = [1.0] * len(rankings) if weights is None else [float(w) for w in weights]
    if len(weight_list) != len(rankings):
        raise ValueError(f"got {len(weight_list)} weights for {len(rankings)} rankings")
    if any(not math.isfinite(w) or w < 0 for w in weight_list):
        raise ValueError(f"weights must be finite and not negative, got {weight_list}")
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"k must be finite and not negative, got {k}")
    ranks: dict[K, list[int | None]] = {}
    for which, ranking in enumerate(rankings):
        for rank, key in enumerate(ranking, start=1):
            slots = ranks.setdefault(key, [None] * len(rankings))
            if slots[which] is None:
                slots[which] = rank
    fused: list[tuple[tuple[float, int, int], Fused[K]]] = []
    for key, slots in ranks.items():
        contributing = [(rank, which) for which, rank in enumerate(slots)
                        if rank is not None and weight_list[which] > 0]
        if not contributing:
            continue
        score = math.fsum(weight_list[which] / (k + rank) for rank, which in contributing)
        best_rank, first_ranking = min(contributing)
        fused.append(((-score, best_rank, first_ranking), Fused(key, score, tuple(slots))))
    fused.sort(key=lambda pair: pair[0])
    return [item for _, item in fused]
