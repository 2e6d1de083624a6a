"""Reciprocal rank fusion on known inputs: scores, weights and a deterministic order for ties."""

from __future__ import annotations

import math

import pytest

from multilane.retrieval.fusion import Fused, fuse


def test_fuse_adds_reciprocal_ranks_across_rankings() -> None:
    fused = fuse([["a", "b", "c"], ["c", "a", "d"]], k=60)

    assert [item.key for item in fused] == ["a", "c", "b", "d"]
    assert fused[0] == Fused("a", 1 / 61 + 1 / 62, (1, 2))
    assert fused[1] == Fused("c", 1 / 63 + 1 / 61, (3, 1))
    assert fused[2] == Fused("b", 1 / 62, (2, None))
    assert fused[3] == Fused("d", 1 / 63, (None, 3))


def test_weights_scale_each_rankings_share() -> None:
    dense, keyword = ["x", "y"], ["y", "x"]

    assert [item.key for item in fuse([dense, keyword], weights=[2.0, 1.0], k=0)] == ["x", "y"]
    favour_keyword = fuse([dense, keyword], weights=[1.0, 3.0], k=0)
    assert [item.key for item in favour_keyword] == ["y", "x"]
    assert favour_keyword[0].score == pytest.approx(1 / 2 + 3 / 1)


def test_k_zero_is_plain_reciprocal_rank() -> None:
    fused = fuse([["p", "q", "r"]], k=0)
    assert [(item.key, item.score) for item in fused] == [("p", 1.0), ("q", 0.5), ("r", pytest.approx(1 / 3))]


def test_ties_break_by_best_rank_then_by_earliest_ranking() -> None:
    # a and b score the same (each is first once and second once): a is first in the earlier ranking.
    assert [item.key for item in fuse([["a", "b"], ["b", "a"]])] == ["a", "b"]
    assert [item.key for item in fuse([["b", "a"], ["a", "b"]])] == ["b", "a"]
    # c and d score the same 1/62 and are both second; c's ranking comes first.
    assert [item.key for item in fuse([["x", "c"], ["y", "d"]])][2:] == ["c", "d"]
    # e (ranks 1 and 4) and f (ranks 2 and 2) can tie only when k makes them; the better best rank wins.
    e_f = fuse([["e", "f"], ["g", "f", "h", "e"]], k=2)  # e: 1/3 + 1/6 = 1/2, f: 1/4 + 1/4 = 1/2
    assert e_f[0].score == pytest.approx(e_f[1].score)
    assert [item.key for item in e_f][:2] == ["e", "f"]


def test_the_same_inputs_always_give_the_same_order() -> None:
    rankings = [[f"doc{i}" for i in range(20)], [f"doc{i}" for i in reversed(range(20))]]
    first = [item.key for item in fuse(rankings)]
    assert all([item.key for item in fuse(rankings)] == first for _ in range(5))
    assert len(first) == 20


def test_a_repeated_key_counts_once_at_its_best_rank() -> None:
    fused = fuse([["a", "b", "a"], ["a"]], k=0)
    assert fused[0] == Fused("a", 2.0, (1, 1))
    assert fused[1] == Fused("b", 0.5, (2, None))


def test_a_zero_weight_ranking_adds_nothing() -> None:
    fused = fuse([["a", "b"], ["c", "a"]], weights=[1.0, 0.0], k=0)
    assert [(item.key, item.score) for item in fused] == [("a", 1.0), ("b", 0.5)]
    assert fused[0].ranks == (1, 2)  # ranks still show where the key was


def test_keys_can_be_any_hashable_value() -> None:
    fused = fuse([[("guide.md", 3), ("guide.md", 4)], [("guide.md", 4)]])
    assert fused[0].key == ("guide.md", 4)


def test_no_rankings_or_empty_rankings_give_nothing() -> None:
    assert fuse([]) == []
    assert fuse([[], []]) == []


@pytest.mark.parametrize(("weights", "k", "message"), [
    ([1.0], 60, "got 1 weights for 2 rankings"),
    ([1.0, -1.0], 60, "weights must be finite and not negative"),
    ([1.0, math.nan], 60, "weights must be finite and not negative"),
    ([1.0, 1.0], -1, "k must be finite and not negative"),
    ([1.0, 1.0], math.inf, "k must be finite and not negative"),
])
def test_bad_weights_or_k_are_refused(weights: list[float], k: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fuse([["a"], ["b"]], weights=weights, k=k)
