"""The ``auto`` rule of attention and attention_varlen on CUDA: which backend to ask first.

Priorities alone cannot say it: the fastest kernel depends on the mask, the dtype and the GPU.
The rule (docs/attention.md, Backends, states the same table), first match wins, the backends it
names asked in its order, the op's other records after them by priority (a named record that
refuses these inputs is passed over as always):

=========================================  ============================================
case (CUDA inputs)                         order
=========================================  ============================================
dense API with a key_padding_mask          triton, cuda, flash_attn, xformers, sdpa
(mask_queries or not)
torch.use_deterministic_algorithms(True)   triton, cuda, flash_attn, sdpa
float32                                    triton, cuda, xformers, sdpa
16-bit (float16, bfloat16)                 flash_attn, triton, cuda, xformers, sdpa
anything else (float64)                    priority order (sdpa, reference)
=========================================  ============================================

Why, from the designs (no GPU has measured any of it; the GPU run's attention benchmark, which
times every backend on the predictor's shapes and FA3's sweep, checks it):

* Key padding on the dense API: triton takes the mask as key lengths (one host read) and
  skips the padded key blocks, and with mask_queries the padded query blocks, so its cost
  follows the real tokens with no copy; flash_attn and xformers must first gather the real
  tokens into packed copies (an index_select of k and v, and of q with mask_queries, a sync
  for the index, and a scatter of the output) and sdpa computes every padded pair.
* Deterministic mode: triton's deterministic backward has no atomics and is bit-identical
  across runs; flash-attn's deterministic flag costs more (FA3's about 17%, and its dQ is not
  bit-identical in every configuration: the flash_attn record then runs flash-attn 2).
* float32: triton runs fp32 on tensor cores (tf32x3, three TF32 MMAs, near-fp32 accuracy);
  flash-attn has no fp32 kernel, xformers' and SDPA's fp32 kernels run on CUDA cores.
* 16-bit without a key padding mask: flash_attn first, which runs FlashAttention-3
  (``flash_attn_interface``, warp-specialised wgmma with TMA: 497 TFLOP/s published at head
  dim 64 on H100, 333-497 from 512 to 16k tokens) on Hopper where installed, else
  flash-attn 2 (its kernels are tuned for sm_80 and run on sm_90 without wgmma or TMA), then
  triton (estimated 300-350 TFLOP/s forward on H200 before issue 15's work, not measured); a
  window or causal mask stays with them (both skip the blocks outside it).
* cuda (the CUDA C++ backend, correctness first, FA2-style) after triton until a GPU run
  shows otherwise; xformers and sdpa last (with key padding sdpa gets a boolean mask and
  computes every padded pair).

On CPU the rule gives no order: sdpa, then the reference (priorities), as before. Named
backends and VLJEPA_FAST_BACKEND[_<OP>] are untouched by the rule.
"""

from __future__ import annotations

import torch

from vljepa_fast import _backends
from vljepa_fast.ops import attention_peers
from vljepa_fast.ops.attention import AttentionInputs, VarlenInputs

__all__ = ["RULE_TEXT", "attention_order"]

PADDED = ("triton", "cuda", "flash_attn", "xformers", "sdpa")
DETERMINISTIC = ("triton", "cuda", "flash_attn", "sdpa")
FLOAT32 = ("triton", "cuda", "xformers", "sdpa")
HALF = ("flash_attn", "triton", "cuda", "xformers", "sdpa")

RULE_TEXT = (
    "on CUDA, first match: key_padding_mask on the dense API -> triton first (padded blocks "
    "skipped, no unpadding copies); deterministic mode -> triton first (no atomics); float32 "
    "-> triton first (tf32x3 tensor cores); 16-bit -> flash_attn first (FlashAttention-3 on "
    "Hopper when installed, else flash-attn 2), then triton; cuda after triton, then xformers, "
    "sdpa, reference. CPU: priority order (sdpa, reference)"
)


@_backends.constant_result
def _fa3_runs(major: int, minor: int, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FlashAttention-3 imports and takes these inputs (an import probe: evaluated
    eagerly under torch.compile, its answer baked into the graph)."""
    if attention_peers._import_reasons(attention_peers.FA3):
        return False
    return not attention_peers.fa3_limits((major, minor), dtype, head_dim)


def attention_order(x: AttentionInputs | VarlenInputs) -> _backends.Order | None:
    """The rule's :class:`~vljepa_fast._backends.Order` for these inputs (None on CPU and for
    float64: the priority order). Reads no tensor on the host."""
    if x.device.type != "cuda":
        return None
    if isinstance(x, AttentionInputs) and x.key_padding_mask is not None:
        what = "key_padding_mask with mask_queries" if x.mask_queries else "key_padding_mask"
        return _backends.Order(
            PADDED,
            f"{what} on the dense API: triton takes it as lengths and skips the padded blocks "
            "(the peers unpad into packed copies first)",
        )
    if torch.are_deterministic_algorithms_enabled():
        return _backends.Order(
            DETERMINISTIC, "deterministic mode: triton's backward has no atomics (bit-identical)"
        )
    dtype = x.q.dtype
    if dtype == torch.float32:
        return _backends.Order(
            FLOAT32, "float32: triton runs it on tensor cores (tf32x3); flash-attn has no fp32"
        )
    if dtype in (torch.float16, torch.bfloat16):
        major, minor = torch.cuda.get_device_capability(x.device)
        fa3 = _fa3_runs(major, minor, dtype, x.q.shape[-1])
        impl = "FlashAttention-3" if fa3 else "flash-attn 2 where installed (no FA3 for these)"
        return _backends.Order(HALF, f"16-bit, no key padding mask: flash_attn first ({impl})")
    return None


for _op in ("attention", "attention_varlen"):
    _backends.register_rule(_op, _backends.AutoRule(RULE_TEXT, attention_order))
