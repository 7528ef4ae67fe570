"""The VL-JEPA model assembled from the fused modules (see docs/VLJEPA.md)."""

from vljepa_fast.models._layers import LoadResult
from vljepa_fast.models.checkpoint_files import read_state_dict
from vljepa_fast.models.config import (
    PredictorConfig,
    VLJEPAConfig,
    XEncoderConfig,
    YDecoderConfig,
    YEncoderConfig,
)
from vljepa_fast.models.params import parameter_breakdown
from vljepa_fast.models.predictor import Predictor, load_llama_layers, meta_rope_rows
from vljepa_fast.models.pretrained import ModuleReport, PretrainedReport, load_pretrained
from vljepa_fast.models.selective_decoding import (
    OnlineSegmenter,
    online_segment_starts,
    segment_embeddings,
    temporal_ward_segments,
)
from vljepa_fast.models.tokenizer import ByteTokenizer, HFTokenizer, TruncationWarning, as_tokenizer
from vljepa_fast.models.vljepa import CAPTION_QUERY, VLJEPA, LabelBank, StreamCaptions
from vljepa_fast.models.x_encoder import XEncoder, load_vjepa2_state_dict, vjepa2_state_dict
from vljepa_fast.models.y_decoder import YDecoder
from vljepa_fast.models.y_encoder import (
    HFTextEncoder,
    TextEncoder,
    load_gemma3_folder,
    load_gemma3_state_dict,
)

__all__ = [
    "CAPTION_QUERY",
    "ByteTokenizer",
    "HFTokenizer",
    "LabelBank",
    "StreamCaptions",
    "TruncationWarning",
    "as_tokenizer",
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
    "load_gemma3_folder",
    "load_gemma3_state_dict",
    "LoadResult",
    "ModuleReport",
    "PretrainedReport",
    "load_pretrained",
    "read_state_dict",
    "load_llama_layers",
    "meta_rope_rows",
    "parameter_breakdown",
    "vjepa2_state_dict",
    "load_vjepa2_state_dict",
    "online_segment_starts",
    "segment_embeddings",
    "temporal_ward_segments",
]
