"""The VL-JEPA model assembled from the fused modules (see docs/VLJEPA.md)."""

from vljepa_fast.models.config import (
    PredictorConfig,
    VLJEPAConfig,
    XEncoderConfig,
    YDecoderConfig,
    YEncoderConfig,
)
from vljepa_fast.models.predictor import Predictor, load_llama_layers
from vljepa_fast.models.selective_decoding import (
    OnlineSegmenter,
    online_segment_starts,
    segment_embeddings,
    temporal_ward_segments,
)
from vljepa_fast.models.tokenizer import ByteTokenizer
from vljepa_fast.models.vljepa import VLJEPA
from vljepa_fast.models.x_encoder import XEncoder, load_vjepa2_state_dict
from vljepa_fast.models.y_decoder import YDecoder
from vljepa_fast.models.y_encoder import HFTextEncoder, TextEncoder

__all__ = [
    "ByteTokenizer",
    "HFTextEncoder",
    "OnlineSegmenter",
    "Predictor",
    "PredictorConfig",
    "TextEncoder",
    "VLJEPA",
    "VLJEPAConfig",
    "XEncoder",
    "XEncoderConfig",
    "YDecoder",
    "YDecoderConfig",
    "YEncoderConfig",
    "load_llama_layers",
    "load_vjepa2_state_dict",
    "online_segment_starts",
    "segment_embeddings",
    "temporal_ward_segments",
]
