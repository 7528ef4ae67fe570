"""vljepa_fast: fused kernels, drop-in modules and benchmarks for VL-JEPA's three hot spots.

Public API (see DESIGN.md):
    vljepa_fast.attention, attention_varlen, infonce_loss, topk_similarity   (functional ops)
    vljepa_fast.backends()                                                    (op x backend table)
    vljepa_fast.nn                                                            (modules)
"""

from vljepa_fast import nn
from vljepa_fast._backends import BackendStatus, BackendUnavailableError, backends
from vljepa_fast.functional import attention, attention_varlen, infonce_loss, topk_similarity

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "attention",
    "attention_varlen",
    "backends",
    "infonce_loss",
    "nn",
    "topk_similarity",
]
