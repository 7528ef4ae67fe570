"""The VL-JEPA model: a full training step and a predictor forward, eager vs fused.

Providers: ``reference`` (the model built with backend="reference": eager attention, loss and
rotary) and ``vf.auto`` (backend="auto": the fused kernels that serve the inputs). Sizes: the
tiny config on CPU (presets smoke and cpu), the paper's predictor and a paper-size training
step on CUDA (presets gpu and paper: bfloat16 predictor, 1024 visual tokens from cached
X-encoder features, 64-token queries, batch 16). The cases live here rather than in
presets.py because they are model configurations, not op shapes.

FLOPs: 6 * trainable parameters * tokens (training step) or 2 * predictor parameters *
tokens (forward), attention not counted; bytes: the parameters, read once.
"""

from __future__ import annotations

import _harness
import torch

import vljepa_fast.models as M

OP = "model"
FORMULA = "train: 6*trainable_params*tokens, fwd: 2*predictor_params*tokens; bytes params once"

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


def _label(c: dict) -> str:
    return f"{c['what']} {c['config']} B{c['B']} F{c['frames']} Q{c['query']} {c['dtype']}"


def pytest_generate_tests(metafunc):
    if not {"case", "provider"} <= set(metafunc.fixturenames):
        return
    name = metafunc.config.getoption("preset") or ("gpu" if torch.cuda.is_available() else "cpu")
    device = "cuda" if name in ("gpu", "paper") else "cpu"
    pairs, ids = [], []
    for c in _CASES[name]:
        c = dict(c, device=device, dtype="bfloat16" if device == "cuda" else "float32")
        c["label"] = _label(c)
        for p in ("reference", "vf.auto"):
            pairs.append((c, p))
            ids.append(f"{c['label']}-{p}".replace(" ", "_"))
    metafunc.parametrize("case,provider", pairs, ids=ids)


def _config(case: dict) -> M.VLJEPAConfig:
    cfg = M.VLJEPAConfig.tiny() if case["config"] == "tiny" else M.VLJEPAConfig.paper()
    # the paper freezes the X-encoder: a training step starts from cached features
    return cfg.replace(freeze_x_encoder=True)


def test_model(benchmark, case, provider):
    device = _harness.device_for(OP, case, provider)
    dtype = _harness.dtype_for(case["dtype"], device)
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

        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flops = 6 * params * B * (n_vis + 2 * L)
    else:

        def make(s):
            return lambda: model.predictor(s[0], s[1], ones)

        params = sum(p.numel() for p in model.predictor.parameters())
        flops = 2 * params * B * (n_vis + L)
    nbytes = params * dtype.itemsize
    _harness.run_case(
        benchmark,
        op=OP,
        case=case,
        provider=provider,
        make=make,
        sets=sets,
        flops=flops,
        nbytes=nbytes,
        formula=FORMULA,
        notes=[f"backend={backend!r}", f"trainable parameters {params}"],
    )
