"""rotary: rotary position embedding of queries and keys (:func:`vljepa_fast.apply_rotary`),
forward alone and forward + backward, at the shapes of the two models that call it: the
predictor ("llama" layout, GQA 32:8, head dim 64, visual plus query tokens) and the X-encoder
("vjepa2" layout, 16 heads of 64, the (t, h, w) token grid). Tables [T, D] float32, as both
models build them with :func:`vljepa_fast.rotary_cos_sin`.

Providers, side by side in one benchmark group per shape and mode:

* ``reference``: the eager reference through dispatch (``backend="reference"``): fp32 copies of
  q and k, the partner channels gathered by cat or stack, three elementwise passes.
* ``reference+compile``: :func:`vljepa_fast.reference.apply_rotary` under torch.compile (cases
  with ``compile``), the fused elementwise code torch writes itself.
* ``vf.<backend>``: every backend registered for ``rotary`` (one launch for q and k), skipped
  with the backend's own reasons where it cannot serve the inputs.

The op is memory-bound: FLOPs are three per element, so GB/s and the roofline fraction (its
bandwidth side) are the columns to read. FLOPs and bytes: :func:`rotary_cost`.
"""

from __future__ import annotations

import functools

import _harness
import torch

import vljepa_fast as vf
from vljepa_fast import _backends, reference
from vljepa_fast.ops import rotary as rotary_op

OP = "rotary"

ROTARY_FORMULA = (
    "flops fwd 3*B*T*(Hq + Hkv)*D (per element of q and k: x*cos, partner*sin and their sum; "
    "the sign s(c) is folded into the table), bwd the same (dx = dout*cos - s*dout[p]*sin), "
    "fwd+bwd twice that; bytes fwd 2*B*T*(Hq + Hkv)*D*s + 2*Bt*T*D*st (read q and k, write "
    "q_rot and k_rot, read cos and sin [Bt, T, D] once; Bt = 1 for [T, D] tables), bwd the "
    "same (read dq_rot, dk_rot and the tables, write dq, dk), fwd+bwd twice that"
)


def rotary_cost(
    B: int,
    T: int,
    Hq: int,
    Hkv: int,
    D: int,
    itemsize: int,
    mode: str,
    *,
    table_batch: int = 1,
    table_itemsize: int = 4,
) -> _harness.Cost:
    """FLOPs and compulsory bytes of one call on q [B, T, Hq, D], k [B, T, Hkv, D] in ``mode``.

    FLOPs: out[c] = x[c]*cos[t, c] + s(c)*x[p(c)]*sin[t, c] is two multiplies and one add per
    element of q and k, 3*B*T*(Hq + Hkv)*D forward; the sign s(c) is no FLOP (the Triton kernel
    folds it into its sin tile, the reference negates a copy). The backward, the transpose
    dx[c] = dout[c]*cos[t, c] - s(c)*dout[p(c)]*sin[t, p(c)], is the same count (the Triton
    kernel runs exactly that; eager autograd one add more per element, assembling the
    zero-padded halves of the partner's gradient). The "vjepa2" tail channels (cos 1, sin 0)
    are counted too: every provider computes them.

    Bytes: forward reads q and k and writes q_rot and k_rot, 2*B*T*(Hq + Hkv)*D*itemsize, and
    reads the cos and sin tables [table_batch, T, D] once, 2*table_batch*T*D*table_itemsize;
    the backward reads dq_rot, dk_rot and the tables and writes dq, dk, the same total (the
    map is linear: nothing of the forward is saved but the tables). A kernel that reads a
    [T, D] table once per batch entry moves B times the table bytes (they stay in cache); the
    reference also writes and reads its fp32 copies and partner tensors, which this count
    leaves out so that every provider is measured against the same work.

    Args:
        B, T, Hq, Hkv, D: batch, tokens, query heads, key heads, head dim.
        itemsize: bytes of one element of q and k.
        mode: "fwd", "bwd" or "fwd+bwd".
        table_batch: leading dimension of the tables: 1 for [T, D] (one table for the batch),
            B for [B, T, D].
        table_itemsize: bytes of one table element (4: float32 tables).
    """
    elements = B * T * (Hq + Hkv) * D
    flops = 3 * elements
    nbytes = 2 * elements * itemsize + 2 * table_batch * T * D * table_itemsize
    return _harness.Cost(
        _harness.mode_total(flops, flops, mode),
        _harness.mode_total(nbytes, nbytes, mode),
        ROTARY_FORMULA,
    )


def _label(c: dict) -> str:
    return (
        f"{c['mode']} {c['what']} B{c['B']} T{c['T']} H{c['Hq']}:{c['Hkv']} hd{c['D']} "
        f"{c['layout']} {c['dtype']}"
    )


def _providers(c: dict) -> list[str]:
    names = ["reference", *(["reference+compile"] if c.get("compile") else [])]
    return names + [f"vf.{r.name}" for r in _backends.records(OP) if r.name != "reference"]


def pytest_generate_tests(metafunc):
    _harness.parametrize(metafunc, OP, _providers, _label)


@functools.cache
def _compiled_reference():
    return torch.compile(reference.apply_rotary)


def positions(case: dict, device: torch.device) -> torch.Tensor:
    """The model's positions of the case's T tokens: [T] for "llama", [T, 3] (t, h, w) grid
    coordinates in token order for "vjepa2" (as XEncoder.grid_positions)."""
    if case["layout"] == "llama":
        return torch.arange(case["T"], device=device)
    axes = (torch.arange(n, device=device) for n in case["grid"])
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class _Rotated:
    """(q_rot, k_rot) of one call, standing for the single output the harness differentiates.

    ``numel()`` is 1, so the harness passes no upstream gradient, and :meth:`backward` runs
    autograd from both outputs at once with the input set's fixed upstream gradients (random,
    built with the set, outside the timing): one rotary backward, nothing added to it.
    """

    def __init__(self, outs: tuple[torch.Tensor, torch.Tensor], grads: tuple) -> None:
        self.outs, self.grads = outs, grads

    def numel(self) -> int:
        return 1

    def backward(self, gradient=None, retain_graph: bool | None = None) -> None:
        torch.autograd.backward(self.outs, self.grads, retain_graph=retain_graph)


def _make(provider: str, layout: str):
    """Input set (q, k, cos, sin, *upstream grads) -> a call of the provider on it."""
    if provider == "reference+compile":
        fn = _compiled_reference()

        def make(s):
            return lambda: _Rotated(fn(*s[:4], layout=layout), s[4:])

        return make
    name = "reference" if provider == "reference" else provider.removeprefix("vf.")

    def make(s):
        # raises BackendUnavailableError with the backend's reasons: the case is skipped
        _backends.select(OP, name, rotary_op.rotary_inputs(*s[:4], layout=layout))
        return lambda: _Rotated(vf.apply_rotary(*s[:4], layout=layout, backend=name), s[4:])

    return make


def test_rotary(benchmark, case, provider):
    bench = _harness.Bench(benchmark, OP, case, provider)
    device, dtype = bench.device, bench.dtype
    B, T, Hq, Hkv, D, layout = (case[key] for key in ("B", "T", "Hq", "Hkv", "D", "layout"))
    grad = case["mode"] != "fwd"
    cos, sin = vf.rotary_cos_sin(positions(case, device), D, layout=layout, dtype=torch.float32)

    def build(seed: int) -> tuple:
        g = torch.Generator(device=device).manual_seed(seed)
        q, k = (
            torch.randn(B, T, h, D, generator=g, device=device, dtype=dtype).requires_grad_(grad)
            for h in (Hq, Hkv)
        )
        ups = tuple(torch.randn_like(x) for x in (q, k)) if grad else ()
        return (q, k, cos, sin, *ups)

    sets = _harness.input_sets((OP, case["label"].split(" ", 1)[1], grad), build, device)
    bench.run(
        _make(provider, layout),
        sets,
        rotary_cost(B, T, Hq, Hkv, D, dtype.itemsize, case["mode"], table_batch=1),  # [T, D]
        compiled=provider == "reference+compile",
    )
