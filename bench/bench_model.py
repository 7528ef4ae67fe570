"""The VL-JEPA model: a full training step and a predictor forward, eager vs fused.

Providers: ``reference`` (the model built with backend="reference": eager attention, loss and
rotary) and ``vf.auto`` (backend="auto": the fused kernels that serve the inputs). Sizes: the
tiny config on CPU (presets smoke and cpu; smoke follows the preset's device, CUDA when there
is one), the paper's predictor and a paper-size training step on CUDA (presets gpu and paper:
bfloat16 predictor, 2048 visual tokens (16 frames, tubelet 2, 16 x 16 patches) from cached
X-encoder features, 64-token queries, batch 16). The cases live here rather than in presets.py
because they are model configurations, not op shapes.

FLOPs and bytes: :func:`model_cost`, counted on the case's own inputs by one untimed call.
"""

from __future__ import annotations

from collections.abc import Callable

import _harness
import torch
from bench_attention import attention_flops
from bench_infonce import infonce_flops

import vljepa_fast.models as M
from vljepa_fast.models._layers import GatedMLP
from vljepa_fast.nn import PredictorAttention

OP = "model"
MODEL_FORMULA = (
    "flops counted on the case's inputs: every nn.Linear call 2*rows*in*out forward, and in a "
    "training step the same again for the weight gradient of a trainable layer and again for "
    "the input gradient where its input needs one; every attention layer by the attention "
    "bench's count over its real lengths (bwd 2.5x fwd); the loss by the InfoNCE bench's "
    "count over the batch; norms, activations and rotary not counted; bytes: the parameters of "
    "the modules that run, read once"
)

_CASES = {
    "cpu": [
        dict(config="tiny", B=16, frames=4, query=16, mode="fwd+bwd", what="train"),
        dict(config="tiny", B=16, frames=4, query=16, mode="fwd", what="predictor"),
    ],
    "gpu": [
        dict(config="paper", B=16, frames=16, query=64, mode="fwd+bwd", what="train"),
        dict(config="paper", B=16, frames=16, query=64, mode="fwd", what="predictor"),
    ],
}
_CASES["smoke"] = [dict(c, B=4) for c in _CASES["cpu"]]
_CASES["paper"] = _CASES["gpu"]
for _c in (c for cases in _CASES.values() for c in cases):
    _c.setdefault("dtype", "auto")  # bfloat16 on CUDA, float32 on CPU


def model_flops(model: torch.nn.Module, call: Callable[[], object], mode: str) -> int:
    """The FLOPs of one call of ``model``, counted while ``call()`` runs once.

    Counted: every ``nn.Linear`` call, 2*rows*in_features*out_features forward; in mode
    "fwd+bwd" the same again for the weight gradient when the weight is trainable, and again
    for the input gradient when the input requires one (the backward GEMMs autograd runs).
    Every :class:`vljepa_fast.nn.PredictorAttention` by :func:`bench_attention.attention_flops`
    over the real lengths of its key padding mask and its sliding window (its projections are
    nn.Linear, counted above). Not counted: norms, activations, rotary, the masked mean
    (O(tokens * dim) each) and the loss (:func:`model_cost` adds it). ``call`` runs with
    autograd as the mode needs it but no backward; the count does not depend on the backend.
    """
    train = mode != "fwd"
    total = 0

    called: set[int] = set()  # the nn.Linear modules called in the current gated MLP

    def count_linear(mod, rows: int, input_grad: bool) -> None:
        nonlocal total
        gemm = 2 * rows * mod.in_features * mod.out_features
        total += gemm
        if train:
            total += gemm * (int(mod.weight.requires_grad) + int(input_grad))

    def on_linear(mod, args, out):
        x = args[0]
        called.add(id(mod))
        count_linear(mod, x.numel() // mod.in_features, x.requires_grad)

    def on_gated_start(mod, args):
        called.discard(id(mod.down_proj))

    def on_gated(mod, args, out):
        # with autograd the down projection runs inside _layers._GatedDown, not as a call
        if id(mod.down_proj) not in called:
            count_linear(mod.down_proj, out.numel() // out.shape[-1], out.requires_grad)

    def on_attention(mod, args, kwargs, out):
        nonlocal total
        x = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("key_padding_mask")
        B, T = x.shape[:2]
        lengths = [T] * B if mask is None else mask.sum(-1).tolist()
        part = "fwd+bwd" if train and x.requires_grad else "fwd"
        window = getattr(mod, "window_size", (-1, -1))  # Gemma-3's sliding layers
        total += attention_flops(lengths, mod.num_heads, mod.head_dim, mod.causal, part, window)

    hooks = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(on_linear))
        elif isinstance(mod, GatedMLP):
            hooks.append(mod.register_forward_pre_hook(on_gated_start))
            hooks.append(mod.register_forward_hook(on_gated))
        elif isinstance(mod, PredictorAttention):
            hooks.append(mod.register_forward_hook(on_attention, with_kwargs=True))
    try:
        with torch.set_grad_enabled(train):
            call()
    finally:
        for h in hooks:
            h.remove()
    return total


def model_cost(
    model: M.VLJEPA, call: Callable[[], object], what: str, mode: str, itemsize: int
) -> tuple[_harness.Cost, int]:
    """(cost of one call, parameters it reads) for a training step or a predictor forward.

    FLOPs: :func:`model_flops` of the modules that run, plus for a training step the InfoNCE
    loss over its B pairs of embeddings (:func:`bench_infonce.infonce_flops`, B read from the
    call's predicted embeddings). Bytes: the parameters of the modules that run (a training
    step: the trainable ones, the frozen X-encoder is skipped through cached features; a
    predictor forward: the predictor's), read once; activations are not counted.
    """
    if what == "train":
        batch: list[int] = []
        hook = model.predictor.register_forward_hook(lambda m, a, out: batch.append(out.shape[0]))
        try:
            flops = model_flops(model, call, mode)
        finally:
            hook.remove()
        flops += infonce_flops(batch[0], model.config.embed_dim, mode)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        flops = model_flops(model, call, mode)
        params = sum(p.numel() for p in model.predictor.parameters())
    return _harness.Cost(flops, params * itemsize, MODEL_FORMULA), params


def _label(c: dict) -> str:
    return f"{c['what']} {c['config']} B{c['B']} F{c['frames']} Q{c['query']} {c['dtype']}"


def pytest_generate_tests(metafunc):
    _harness.parametrize(
        metafunc, OP, lambda c: ["reference", "vf.auto"], _label, cases=lambda name: _CASES[name]
    )


def _config(case: dict) -> M.VLJEPAConfig:
    cfg = M.VLJEPAConfig.tiny() if case["config"] == "tiny" else M.VLJEPAConfig.paper()
    # the paper freezes the X-encoder: a training step starts from cached features
    return cfg.replace(freeze_x_encoder=True)


def test_model(benchmark, case, provider):
    bench = _harness.Bench(benchmark, OP, case, provider)
    device, dtype = bench.device, bench.dtype
    backend = "reference" if provider == "reference" else "auto"
    cfg = _config(case)
    torch.manual_seed(0)
    with torch.device(device):
        model = M.VLJEPA(cfg, backend=backend).to(dtype)
    xc, pc = cfg.x_encoder, cfg.predictor
    n_vis = (case["frames"] // xc.tubelet) * (xc.image_size // xc.patch) ** 2
    B, L = case["B"], case["query"]

    def build(seed: int) -> tuple:
        g = torch.Generator(device=device).manual_seed(seed)
        feats = torch.randn(B, n_vis, xc.dim, generator=g, device=device, dtype=dtype)
        q = torch.randint(0, pc.pad_id, (B, L), generator=g, device=device)
        t = torch.randint(1, cfg.y_encoder.vocab_size, (B, L), generator=g, device=device)
        return feats, q, t

    sets = _harness.input_sets((OP, case["label"], provider), build, device)
    ones = torch.ones(B, L, dtype=torch.bool, device=device)
    if case["what"] == "train":

        def make(s):
            return lambda: model(None, (s[1], ones), (s[2], ones), x_features=s[0])
    else:

        def make(s):
            return lambda: model.predictor(s[0], s[1], ones)

    with bench.guard():
        cost, params = model_cost(model, make(sets[0]), case["what"], case["mode"], dtype.itemsize)
    bench.run(make, sets, cost, notes=[f"backend={backend!r}", f"parameters read {params}"])
