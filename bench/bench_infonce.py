"""infonce_loss: the bidirectional InfoNCE loss of VL-JEPA (temperature 0.07, normalised rows,
mean reduction), forward alone and forward + backward.

Providers, side by side in one benchmark group per shape and mode:

* ``reference``: the eager reference (materialises the N x N logits, two softmax passes).
* ``reference+compile``: the eager reference under torch.compile (cases with ``compile``).
* ``vf.<backend>``: every backend registered for the op (fused: no N x N buffer), skipped with
  the backend's own reasons where it cannot serve the inputs.
* ``open_clip.ClipLoss``: open_clip's CLIP loss on the normalised rows with logit scale
  1 / temperature (the same loss), when open_clip is importable.

FLOPs and bytes: see _harness.INFONCE_FORMULA. The peak-memory column is the point of this
file: eager grows with N^2 (the logits and their softmax), fused with N*D.
"""

from __future__ import annotations

import functools

import _harness
import torch
import torch.nn.functional as F

import vljepa_fast as vf
from vljepa_fast import _backends, reference

OP = "infonce"
BACKEND_OP = "infonce_loss"
TEMPERATURE = 0.07


def _label(c: dict) -> str:
    return f"{c['mode']} N{c['N']} D{c['D']} {c['dtype']}"


def _providers(c: dict) -> list[str]:
    fused = [f"vf.{r.name}" for r in _backends.records(BACKEND_OP) if r.name != "reference"]
    compiled = ["reference+compile"] if c.get("compile") else []
    return ["reference", *compiled, *fused, "open_clip.ClipLoss"]


def pytest_generate_tests(metafunc):
    _harness.parametrize(metafunc, OP, _providers, _label)


@functools.cache
def _compiled_reference():
    return torch.compile(reference.infonce_loss)


def _make(provider: str):
    if provider == "reference+compile":
        fn = _compiled_reference()
        return lambda s: lambda: fn(s[0], s[1], temperature=TEMPERATURE)
    if provider == "open_clip.ClipLoss":

        def make(s):
            open_clip = _harness.import_peer("open_clip", "open-clip-torch")
            loss = open_clip.loss.ClipLoss()
            scale = torch.tensor(1.0 / TEMPERATURE, device=s[0].device)
            return lambda: loss(F.normalize(s[0], dim=-1), F.normalize(s[1], dim=-1), scale)

        return make
    name = provider.removeprefix("vf.")

    def make(s):
        kw = {
            "temperature": TEMPERATURE,
            "symmetric": True,
            "normalize": True,
            "reduction": "mean",
            "group": None,
        }
        _backends.select(BACKEND_OP, name, (s[0], s[1]), kw)  # raises with its reasons
        return lambda: vf.infonce_loss(s[0], s[1], temperature=TEMPERATURE, backend=name)

    return make


def test_infonce(benchmark, case, provider):
    device = _harness.device_for(OP, case, provider)
    dtype = _harness.dtype_for(case["dtype"], device)
    N, D, mode = case["N"], case["D"], case["mode"]
    grad = mode != "fwd"

    def build(seed: int) -> tuple:
        g = torch.Generator(device=device).manual_seed(seed)
        return tuple(
            torch.randn(N, D, generator=g, device=device, dtype=dtype).requires_grad_(grad)
            for _ in range(2)
        )

    sets = _harness.input_sets((OP, N, D, case["dtype"], grad), build, device)
    _harness.run_case(
        benchmark,
        op=OP,
        case=case,
        provider=provider,
        make=_make(provider),
        sets=sets,
        flops=_harness.infonce_flops(N, D, mode),
        nbytes=_harness.infonce_bytes(N, D, dtype.itemsize, mode),
        formula=_harness.INFONCE_FORMULA,
        compiled=provider == "reference+compile",
    )
