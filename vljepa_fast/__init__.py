"""vljepa_fast: fused kernels, drop-in modules and benchmarks for VL-JEPA's three hot spots.

Public API (see docs/DESIGN.md):
    vljepa_fast.attention, attention_varlen, infonce_loss, sigmoid_loss, topk_similarity
                                                                              (functional ops)
    vljepa_fast.apply_rotary, rotary_cos_sin                                  (RoPE)
    vljepa_fast.backends()                                                    (op x backend table)
    vljepa_fast.nn                                                            (modules)
    vljepa_fast.models                          (VLJEPAConfig, VLJEPA, temporal_ward_segments)
"""

from vljepa_fast import models, nn
from vljepa_fast._backends import BackendStatus, BackendUnavailableError, backends
from vljepa_fast.functional import (
    attention,
    attention_varlen,
    infonce_loss,
    sigmoid_loss,
    topk_similarity,
)
from vljepa_fast.ops.rotary import LLAMA3_ROPE_SCALING, apply_rotary, rotary_cos_sin

__version__ = "0.1.0"

__all__ = [
    "LLAMA3_ROPE_SCALING",
    "BackendStatus",
    "BackendUnavailableError",
    "attention",
    "apply_rotary",
    "attention_varlen",
    "backends",
    "infonce_loss",
    "models",
    "nn",
    "rotary_cos_sin",
    "sigmoid_loss",
    "topk_similarity",
]
