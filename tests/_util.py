"""Helpers shared by the tests: tolerances and checks that can fail."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from vljepa_fast import reference

#: error floor per dtype added to "2x the eager error in the same dtype" (docs/DESIGN.md, Tests)
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(x: Tensor, ref: Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close_2x(
    got: Tensor, eager: Tensor, exact: Tensor, dtype: torch.dtype, what: str = ""
) -> None:
    """|got - exact| <= 2 |eager - exact| + floor(dtype), elementwise max; NaN always fails."""
    assert not torch.isnan(got).any(), f"{what}: NaN in result"
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    scale = max(exact.double().abs().max().item(), 1.0) if exact.numel() else 1.0
    bound = 2 * max_err(eager, exact) + FLOOR[dtype] * scale
    err = max_err(got, exact)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (dtype {dtype})"


def check_topk(
    scores: Tensor, indices: Tensor, queries: Tensor, bank: Tensor, k: int, metric: str, atol: float
) -> None:
    """Scores equal the float64 top-k values, and each index points at a row with that score."""
    q, b = queries.double(), bank.double()
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1, eps=1e-12)
        b = torch.nn.functional.normalize(b, dim=1, eps=1e-12)
    full = q @ b.T
    want = full.topk(k, dim=1).values
    Q = queries.shape[0]
    assert scores.shape == (Q, k) and indices.shape == (Q, k)
    assert indices.dtype == torch.int64
    assert not torch.isnan(scores).any()
    assert (indices >= 0).all() and (indices < bank.shape[0]).all(), "index out of range"
    for r in range(Q):
        assert indices[r].unique().numel() == k, f"row {r}: repeated index"
    assert torch.all(scores[:, :-1] >= scores[:, 1:]), "scores not sorted descending"
    torch.testing.assert_close(scores.double(), want, atol=atol, rtol=0)
    at_idx = full.gather(1, indices)
    torch.testing.assert_close(at_idx, scores.double(), atol=atol, rtol=0)


def topk_scores64(queries: Tensor, bank: Tensor, metric: str) -> Tensor:
    """The full [Q, N] float64 score matrix of the (already rounded) inputs."""
    q, b = queries.double().cpu(), bank.double().cpu()
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1, eps=1e-12)
        b = torch.nn.functional.normalize(b, dim=1, eps=1e-12)
    return q @ b.T


def topk_expected(
    queries: Tensor, bank: Tensor, k: int, metric: str, fp32_order: bool = False
) -> tuple[Tensor, Tensor]:
    """(float64 scores, indices) of the documented topk_similarity order, by a full stable sort
    (independent of the library's code): descending, NaN below -inf, ties lowest index first.

    fp32_order: rank the float64 scores rounded to float32 (for exact integer inputs whose
    products overflow fp32 to +-inf in every kernel).
    """
    s = topk_scores64(queries, bank, metric)
    rank = s.float().double() if fp32_order else s
    nan = rank.isnan()
    key = rank.masked_fill(nan, float("-inf"))
    order = key.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, nan.gather(1, order).to(torch.uint8).argsort(dim=1, stable=True))
    idx = order[:, :k]
    return rank.gather(1, idx), idx


def topk_tie_inputs(
    num_queries: int, num_bank: int, dim: int, dtype: torch.dtype, metric: str, seed: int,
    groups: int = 12,
) -> tuple[Tensor, Tensor]:
    """Queries and a bank of exact duplicates of ``groups`` random base rows, built so that every
    score is exact in fp32 whatever the order of the sums, hence bit-equal in every backend and
    in float64 (exact ties, also between different base rows): for "ip" small integers; for
    "cosine" entries +-1 with ``dim`` a power of 4, so that every norm is a power of two."""
    g = torch.Generator().manual_seed(seed)
    if metric == "ip":
        base = torch.randint(-3, 4, (groups, dim), generator=g)
        q = torch.randint(-3, 4, (num_queries, dim), generator=g)
    else:
        assert dim in (1, 4, 16, 64, 256), "cosine ties need norms that are powers of two"
        base = torch.randint(0, 2, (groups, dim), generator=g) * 2 - 1
        q = torch.randint(0, 2, (num_queries, dim), generator=g) * 2 - 1
    bank = base[torch.randint(0, groups, (num_bank,), generator=g)]
    return q.to(dtype), bank.to(dtype)


def infonce_terms_and_grads(a, b, scale, offset, normalize, col_stats, g_row, g_col, cdt):
    """reference terms and the gradients of sum g_row (row_lse - pos_row) + sum g_col (...)."""
    a = a.detach().to(cdt if cdt == torch.float64 else a.dtype).requires_grad_(True)
    b = b.detach().to(a.dtype).requires_grad_(True)
    s = scale.detach().to(cdt).requires_grad_(True)
    terms = reference.infonce_terms(
        a, b, s, offset=offset, normalize=normalize, col_stats=col_stats
    )
    loss = (g_row.to(terms[0].dtype) * (terms[0] - terms[2])).sum()
    if col_stats:
        loss = loss + (g_col.to(terms[1].dtype) * (terms[1] - terms[3])).sum()
    da, db, ds = torch.autograd.grad(loss, (a, b, s))
    return [t for t in terms if t is not None], (da, db, ds)


def check_against_float64(
    got_terms, got_grads, a, b, scale, offset, normalize, col_stats, g_row, g_col
) -> None:
    """A native infonce_fwd's terms (all four, or row_lse and pos_row without col_stats) and
    infonce_bwd's (da, db, dscale) against float64, each within 2x the float32 eager error.

    The kernels' LSEs are float64 and their positives float32; eager's terms are float32, so
    every term is held to float32's floor, and the gradients to the input dtype's (dscale:
    float32's).
    """
    exact_terms, exact_grads = infonce_terms_and_grads(
        a, b, scale, offset, normalize, col_stats, g_row, g_col, torch.float64
    )
    eager_terms, eager_grads = infonce_terms_and_grads(
        a, b, scale, offset, normalize, col_stats, g_row, g_col, torch.float32
    )
    names = ["row_lse", "col_lse", "pos_row", "pos_col"] if col_stats else ["row_lse", "pos_row"]
    for name, got, eager, exact in zip(names, got_terms, eager_terms, exact_terms):
        assert torch.isfinite(got).all(), f"{name}: non-finite"
        assert_close_2x(got, eager, exact, torch.float32, name)
    for name, got, eager, exact in zip(["da", "db", "dscale"], got_grads, eager_grads, exact_grads):
        assert torch.isfinite(got).all(), f"{name}: non-finite"
        assert_close_2x(got, eager, exact, a.dtype if name != "dscale" else torch.float32, name)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[list[Tensor]]:
    """NaN-fill every floating tensor made by torch.empty / torch.empty_like inside the block.

    ``with poisoned_allocations() as made: ...``: ``made`` lists the poisoned tensors (assert it
    is not empty where the code under test allocates through torch: poisoning that reached no
    allocation proves nothing). The conftest fixture ``poisoned`` is this for a whole test.
    Native code allocates in C++ and is not reached (tests/test_infonce_cuda.py poisons the CUDA
    caching allocator for that).
    """
    made: list[Tensor] = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: Tensor) -> Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
            made.append(t)
        return t

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_empty_like(*a, **kw))
    try:
        yield made
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def cuda_library_dump(*args: str) -> str:
    """stdout of ``cuobjdump ARGS`` on the built CUDA library (the toolkit's cuobjdump, else the
    one Triton ships); fails when the library is not built (CI builds it:
    ``python -m vljepa_fast.build``)."""
    import subprocess

    from vljepa_fast import _ext

    st = _ext.load("cuda")
    assert st.path is not None and st.path.is_file(), (
        "the CUDA library is not built (python -m vljepa_fast.build): " + "; ".join(st.reasons)
    )
    home = _ext.find_cuda_home()
    tool = home / "bin" / "cuobjdump" if home is not None else None
    if tool is None or not tool.is_file():
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    proc = subprocess.run([str(tool), *args, str(st.path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def dump_sections(text: str, header: str, tag: str) -> dict[str, str]:
    """{mangled name: its section} of the functions whose names hold ``tag`` in a cuobjdump
    listing whose sections start with ``header`` followed by the name (``"Function"`` for
    --dump-resource-usage, ``"Function :"`` for -sass)."""
    import re

    parts = re.split(rf"{header}\s*(\S+?):?\s*\n", text)
    sections = {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    return {name: body for name, body in sections.items() if tag in name}


def assert_no_spills(sections: dict[str, str], what: str) -> None:
    """Every --dump-resource-usage section shows no stack frame and no local memory (ptxas
    spilled no register)."""
    import re

    assert sections, f"{what}: no function found"
    for name, body in sections.items():
        res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", body)
        assert res is not None, f"{what} {name}: no resource line in {body[:200]!r}"
        stack, local = int(res.group(2)), int(res.group(4))
        assert stack == 0 and local == 0, f"{what} {name}: STACK {stack}, LOCAL {local} (spills)"
