"""Selective decoding: constrained Ward equals a brute-force O(T^3) agglomeration, finds planted
change points; the online variant; bad inputs."""

from __future__ import annotations

import pytest
import torch

import vljepa_fast.models as M


def _brute_force(x: torch.Tensor, n: int) -> list[int]:
    """Naive constrained Ward: each step recomputes every adjacent merge's rise in the total
    within-segment sum of squares from the raw points and takes the smallest (leftmost on ties)."""
    x = x.double()
    segs = [[i] for i in range(x.shape[0])]

    def sse(rows):
        p = x[rows]
        return float(((p - p.mean(0)) ** 2).sum())

    while len(segs) > n:
        costs = [
            sse(segs[i] + segs[i + 1]) - sse(segs[i]) - sse(segs[i + 1])
            for i in range(len(segs) - 1)
        ]
        i = min(range(len(costs)), key=lambda j: (costs[j], j))
        segs[i : i + 2] = [segs[i] + segs[i + 1]]
    return [s[0] for s in segs]


@pytest.mark.parametrize("seed", range(6))
def test_ward_equals_brute_force_on_random_streams(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(8, 40, (1,), generator=g))
    D = int(torch.randint(1, 6, (1,), generator=g))
    x = torch.randn(T, D, generator=g).cumsum(0) * (seed % 2) + torch.randn(T, D, generator=g)
    for n in sorted({1, 2, T // 3 + 1, T // 2, T - 1, T}):
        got = M.temporal_ward_segments(x, n)
        assert got.dtype == torch.long and got.shape == (n,)
        assert got.tolist() == _brute_force(x, n), f"T={T} D={D} n={n}"


@pytest.mark.parametrize("seed", range(3))
def test_planted_change_points_are_recovered(seed):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(3, 30, (8,), generator=g).tolist()
    means = torch.randn(8, 16, generator=g) * 3
    x = torch.cat([means[i] + 0.2 * torch.randn(n, 16, generator=g) for i, n in enumerate(lengths)])
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    assert torch.equal(M.temporal_ward_segments(x, 8), starts)
    online = M.online_segment_starts(x, window=4, threshold=2.0)
    assert torch.equal(online, starts)
    seg = M.segment_embeddings(x, starts)
    torch.testing.assert_close(seg, means, atol=0.25, rtol=0)
    mid = M.segment_embeddings(x, starts, mode="midpoint")
    assert torch.equal(mid[0], x[(lengths[0] - 1) // 2])


def test_scales_to_long_streams():
    x = torch.randn(20000, 8)
    got = M.temporal_ward_segments(x, 100)
    assert got[0] == 0 and torch.all(got[1:] > got[:-1]) and got.shape == (100,)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"n_segments: expected an int in \[1, T = 5\]"):
        M.temporal_ward_segments(torch.randn(5, 2), 6)
    with pytest.raises(ValueError, match=r"expected a floating \[T, D\] tensor"):
        M.temporal_ward_segments(torch.randn(5), 2)
    with pytest.raises(ValueError, match="NaN"):
        M.temporal_ward_segments(torch.tensor([[0.0], [float("nan")]]), 1)
    with pytest.raises(ValueError, match="window"):
        M.OnlineSegmenter(1, 1.0)
    with pytest.raises(ValueError, match="starts"):
        M.segment_embeddings(torch.randn(5, 2), torch.tensor([1, 3]))
