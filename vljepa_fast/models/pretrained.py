"""The whole model from local checkpoints (no hub access).

:func:`load_pretrained` builds :class:`~vljepa_fast.models.VLJEPA`, reads each module's path
with :func:`~vljepa_fast.models.read_state_dict` (files and folders, see
:mod:`vljepa_fast.models.checkpoint_files`), checks the config files found next to the weights,
loads each module with its layout-detecting loader and returns a :class:`PretrainedReport` of
what was loaded from where.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

from torch import Tensor

from vljepa_fast._backends import BackendSpec
from vljepa_fast.models.checkpoint_files import as_path, read_json, read_state_dict
from vljepa_fast.models.config import (
    PredictorConfig,
    VLJEPAConfig,
    XEncoderConfig,
    YEncoderConfig,
)
from vljepa_fast.models.predictor import load_llama_layers
from vljepa_fast.models.vljepa import VLJEPA
from vljepa_fast.models.x_encoder import load_vjepa2_state_dict
from vljepa_fast.models.y_encoder import (
    load_gemma3_folder,
    load_gemma3_state_dict,
    read_sentence_transformers,
)
from vljepa_fast.ops.rotary import check_rope_scaling

__all__ = ["ModuleReport", "PretrainedReport", "load_pretrained"]


# ------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModuleReport:
    """What :func:`load_pretrained` did for one module.

    Attributes:
        path: the file or folder loaded, or None (the module keeps its random init).
        layout: the key layout the loader detected (e.g. "original", "transformers", "meta",
            "sentence-transformers"), None when nothing was loaded.
        ignored: checkpoint keys deliberately not loaded (another part of the checkpoint),
            in the checkpoint's naming, sorted.
        notes: anything else worth knowing (parameters that stay random, config fields that
            differ from the config file next to the weights when ``strict=False``).
    """

    path: Path | None
    layout: str | None = None
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def loaded(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class PretrainedReport:
    """Per module (``x_encoder``, ``predictor``, ``y_encoder``) a :class:`ModuleReport`;
    ``report["predictor"]`` works too, and ``str(report)`` is a readable summary."""

    x_encoder: ModuleReport
    predictor: ModuleReport
    y_encoder: ModuleReport

    def __getitem__(self, name: str) -> ModuleReport:
        if name not in ("x_encoder", "predictor", "y_encoder"):
            raise KeyError(name)
        return getattr(self, name)

    def __str__(self) -> str:
        lines = []
        for name in ("x_encoder", "predictor", "y_encoder"):
            r = self[name]
            if r.path is None:
                lines.append(f"{name}: random init (no path given)")
            else:
                lines.append(f"{name}: {r.path} ({r.layout} layout, {len(r.ignored)} keys ignored)")
            lines.extend(f"  {n}" for n in r.notes)
        return "\n".join(lines)


_CONFIG_NAMES = {
    "vjepa2": ("config.json",),
    "llama": ("config.json", "params.json"),
    "gemma3": ("config.json",),
}


def _config_folder(path: Path) -> Path | None:
    """Where a checkpoint's config file is looked for: the folder itself, or the folder a
    checkpoint file lies in (None for a path that is neither)."""
    if path.is_dir():
        return path
    return path.parent if path.is_file() else None


def _config_file(path: Path, kind: str) -> tuple[Path, dict] | None:
    """The config.json (transformers) or, for Llama, params.json (Meta's) of a checkpoint:
    in the folder given, or next to the file given (its folder); the first found, in that
    order. None when there is none."""
    folder = _config_folder(path)
    if folder is None:
        return None
    names = _CONFIG_NAMES[kind]
    meta = path.name.startswith("consolidated.") or any(folder.glob("consolidated.*.pth"))
    if kind == "llama" and meta:  # Meta's weights: their params.json, not a stray config.json
        names = tuple(reversed(names))
    for name in names:
        f = folder / name
        if f.is_file():
            d = read_json(f)
            if not isinstance(d, dict):
                raise ValueError(f"{f}: expected a JSON object, got {type(d).__name__}")
            return f, d
    return None


def _differ(pairs: list[tuple[str, str, object, object]]) -> list[str]:
    """(config field, file field, file value, config value) -> the disagreements, named."""
    out = []
    for ours, theirs, file_value, our_value in pairs:
        if file_value is None:
            continue
        same = (
            abs(float(file_value) - float(our_value)) <= 1e-12 * max(1.0, abs(float(our_value)))
            if isinstance(our_value, float) and isinstance(file_value, int | float)
            else file_value == our_value
        )
        if not same:
            out.append(f"{ours} = {our_value!r} but the file's {theirs} = {file_value!r}")
    return out


def _check_vjepa2_config(d: dict, c: XEncoderConfig) -> list[str]:
    if d.get("model_type") not in (None, "vjepa2"):
        return [f"model_type {d['model_type']!r} is not 'vjepa2'"]
    pairs = [
        ("dim", "hidden_size", d.get("hidden_size"), c.dim),
        ("depth", "num_hidden_layers", d.get("num_hidden_layers"), c.depth),
        ("heads", "num_attention_heads", d.get("num_attention_heads"), c.heads),
        ("patch", "patch_size", d.get("patch_size"), c.patch),
        ("tubelet", "tubelet_size", d.get("tubelet_size"), c.tubelet),
        ("in_chans", "in_chans", d.get("in_chans"), c.in_chans),
        ("image_size", "crop_size", d.get("crop_size"), c.image_size),
        ("norm_eps", "layer_norm_eps", d.get("layer_norm_eps"), c.norm_eps),
    ]
    if isinstance(d.get("mlp_ratio"), int | float) and isinstance(d.get("hidden_size"), int):
        pairs.append(
            ("mlp_dim", "mlp_ratio * hidden_size",
             int(d["hidden_size"] * d["mlp_ratio"]), c.mlp_dim)
        )  # fmt: skip
    return _differ(pairs)


def _rope_kind(scaling: object) -> str:
    """"default" or "llama3": what the predictor's RoPE does with this ``rope_scaling``
    (None and {"rope_type": "default"} alike scale nothing)."""
    checked = check_rope_scaling(scaling)
    return "default" if checked is None else checked["rope_type"]


def _check_llama_config(f: Path, d: dict, c: PredictorConfig) -> list[str]:
    if f.name == "params.json":  # Meta's
        # Meta's ModelArgs: use_scaled_rope defaults to False (absent: no scaling)
        scaled = d.get("use_scaled_rope", False)
        if not isinstance(scaled, bool):
            return [f"use_scaled_rope: expected a JSON bool, got {scaled!r}"]
        out = _differ([
            ("dim", "dim", d.get("dim"), c.dim),
            ("heads", "n_heads", d.get("n_heads"), c.heads),
            ("kv_heads", "n_kv_heads", d.get("n_kv_heads", d.get("n_heads")), c.kv_heads),
            ("vocab_size", "vocab_size", d.get("vocab_size"), c.vocab_size),
            ("rms_eps", "norm_eps", d.get("norm_eps"), c.rms_eps),
            ("rope_theta", "rope_theta", d.get("rope_theta"), c.rope_theta),
        ])  # fmt: skip
        if isinstance(d.get("dim"), int) and isinstance(d.get("n_heads"), int):
            out += _differ([("head_dim", "dim / n_heads", d["dim"] // d["n_heads"], c.head_dim)])
        if scaled != (_rope_kind(c.rope_scaling) == "llama3"):
            absent = "" if "use_scaled_rope" in d else " (absent: Meta's default)"
            out.append(
                f"rope_scaling = {c.rope_scaling!r} but the file's use_scaled_rope = "
                f"{scaled}{absent}"
            )
        return out
    if d.get("model_type") not in (None, "llama"):
        return [f"model_type {d['model_type']!r} is not 'llama'"]
    rope = d.get("rope_parameters") or {}
    scaling = rope if rope else (d.get("rope_scaling") or {})
    heads = d.get("num_attention_heads")
    head_dim = d.get("head_dim")
    if head_dim is None and isinstance(d.get("hidden_size"), int) and isinstance(heads, int):
        head_dim = d["hidden_size"] // heads
    out = _differ([
        ("dim", "hidden_size", d.get("hidden_size"), c.dim),
        ("heads", "num_attention_heads", heads, c.heads),
        ("kv_heads", "num_key_value_heads", d.get("num_key_value_heads", heads), c.kv_heads),
        ("head_dim", "head_dim", head_dim, c.head_dim),
        ("mlp_dim", "intermediate_size", d.get("intermediate_size"), c.mlp_dim),
        ("vocab_size", "vocab_size", d.get("vocab_size"), c.vocab_size),
        ("rms_eps", "rms_norm_eps", d.get("rms_norm_eps"), c.rms_eps),
        ("rope_theta", "rope_theta", rope.get("rope_theta", d.get("rope_theta")), c.rope_theta),
    ])  # fmt: skip
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    ours = check_rope_scaling(c.rope_scaling)
    if ours is None or ours["rope_type"] == "default":
        if kind != "default":
            out.append(f"rope_scaling = None but the file's RoPE type is {kind!r}")
    else:
        theirs = {k: scaling.get(k) for k in ours if k != "rope_type"}
        theirs["rope_type"] = kind
        out += _differ([(f"rope_scaling[{k!r}]", k, theirs[k], ours[k]) for k in ours])
    layers = d.get("num_hidden_layers")
    if isinstance(layers, int) and layers < c.first_llama_layer + c.layers:
        out.append(
            f"first_llama_layer + layers = {c.first_llama_layer + c.layers} but the file's "
            f"num_hidden_layers = {layers}"
        )
    return out


def _check_gemma3_config(d: dict, c: YEncoderConfig) -> list[str]:
    """A Gemma-3 config.json against ``config.y_encoder`` (the fields config.json holds: the
    Dense stack, normalisation, max_len and lr_multiplier are not in it)."""
    keep = dict(
        dense=c.dense, dense_bias=c.dense_bias, normalize=c.normalize, max_len=c.max_len,
        lr_multiplier=c.lr_multiplier,
    )  # fmt: skip
    try:
        theirs = YEncoderConfig.from_gemma3_config(d, **keep)
    except ValueError as e:
        return [str(e)]
    return _y_encoder_diffs(c, theirs, "file's")


_CHECKS = {"vjepa2": _check_vjepa2_config, "gemma3": _check_gemma3_config}


def _config_notes(what: str, path: Path, kind: str, cfg: object, strict: bool) -> tuple[str, ...]:
    """Check the config file of a checkpoint (see :func:`_config_file`) against ``cfg``:
    raise under ``strict`` on a disagreement, else return notes saying which file was checked
    and what it disagrees on (or that none was found)."""
    try:
        found = _config_file(path, kind)
    except ValueError as e:  # unreadable: refused under strict, a note otherwise
        if strict:
            raise ValueError(f"{what}: {e} (pass strict=False to load without it)") from None
        return (f"config file not checked: {e}",)
    if found is None:
        folder = _config_folder(path)
        if folder is None:
            return ()  # not a file or folder: read_state_dict names it
        names = " or ".join(_CONFIG_NAMES[kind])
        return (f"no config file checked: no {names} in {folder}",)
    f, d = found
    diffs = _CHECKS[kind](d, cfg) if kind in _CHECKS else _check_llama_config(f, d, cfg)
    if not diffs:
        return (f"{f} checked: agrees with the config",)
    if strict:
        raise ValueError(
            f"{what}: {f} disagrees with the model config ({type(cfg).__name__}): "
            + "; ".join(diffs)
            + " (fix the config, or pass strict=False to load anyway)"
        )
    return tuple(f"{f} disagrees with the config: {x}" for x in diffs)


def _read_for(name: str, path: Path) -> dict[str, Tensor]:
    try:
        return read_state_dict(path)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _st_transformer(name: str, path: Path) -> Path | None:
    """The Transformer module's folder of a sentence-transformers folder (modules.json, by
    :func:`~vljepa_fast.models.read_sentence_transformers`), None for another path."""
    if not (path.is_dir() and (path / "modules.json").is_file()):
        return None
    try:
        with warnings.catch_warnings():  # load_gemma3_folder has said what it warns about
            warnings.simplefilter("ignore")
            return read_sentence_transformers(path).transformer
    except ValueError as e:
        raise ValueError(f"{name} ({path}): {e}") from None


def _tokenizer_folder(name: str, path: Path | None) -> Path | None:
    """Where a checkpoint folder holds a transformers tokenizer: a sentence-transformers
    folder's Transformer module folder (e.g. ``0_Transformer``), else the folder itself."""
    if path is None or not path.is_dir():
        return None
    names = ("tokenizer.json", "tokenizer_config.json")
    for folder in (_st_transformer(name, path), path):
        if folder is not None and any((folder / n).is_file() for n in names):
            return folder
    return None


def _y_encoder_diffs(
    ours: YEncoderConfig, folder: YEncoderConfig, whose: str = "folder's"
) -> list[str]:
    """Fields of two Y-encoder configs that differ, named; the layer kinds are compared as
    ``attention_types`` (an explicit ``layer_types`` equals the pattern rule it spells)."""
    out = []
    for f in fields(ours):
        if f.name in ("layer_types", "sliding_window_pattern"):
            continue
        a, b = getattr(ours, f.name), getattr(folder, f.name)
        if a != b:
            out.append(f"{f.name} = {a!r} but the {whose} is {b!r}")
    if ours.attention_types != folder.attention_types:
        out.append(
            f"attention_types = {ours.attention_types!r} but the {whose} are "
            f"{folder.attention_types!r}"
        )
    return out


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "modules.json").is_file() or (path / "config.json").is_file())


def load_pretrained(
    config: VLJEPAConfig,
    *,
    x_encoder: str | os.PathLike | None = None,
    predictor: str | os.PathLike | None = None,
    y_encoder: str | os.PathLike | None = None,
    backend: BackendSpec = "auto",
    query_tokenizer: object | None = None,
    text_tokenizer: object | None = None,
    decoder_tokenizer: object | None = None,
    strict: bool = True,
) -> tuple[VLJEPA, PretrainedReport]:
    """Build :class:`~vljepa_fast.models.VLJEPA` from ``config`` and load local checkpoints.

    Each path is a file or folder :func:`read_state_dict` reads. Every file is read (and every
    config file with the weights checked, see ``strict``) before the model is built; the
    loaders then check the keys and load nothing into a module whose checkpoint does not fit.

    The config files checked ("the folder" is the path itself when it is a folder, else the
    folder the checkpoint file lies in):

    * ``x_encoder``: the folder's ``config.json`` (transformers ``VJEPA2Config``).
    * ``predictor``: the folder's ``config.json`` (transformers ``LlamaConfig``), else its
      ``params.json`` (Meta's; an absent ``use_scaled_rope`` means no RoPE scaling, as Meta's
      ``ModelArgs`` reads it).
    * ``y_encoder`` folder with ``modules.json`` or ``config.json``: the Transformer module's
      ``config.json`` (the folder's, or the subfolder modules.json names), which builds the
      encoder; any other ``y_encoder`` path (a Gemma-3 state dict): the folder's
      ``config.json`` (``Gemma3TextConfig``), against ``config.y_encoder`` on the fields it
      holds (not ``dense``, ``dense_bias``, ``normalize``, ``max_len``, ``lr_multiplier``).

    The report's notes name the config file checked ("... checked: agrees with the config",
    or each disagreement under ``strict=False``), or say that none was found.

    * ``x_encoder``: V-JEPA 2 weights, either layout, by
      :func:`~vljepa_fast.models.load_vjepa2_state_dict`.
    * ``predictor``: Llama weights (transformers or Meta's), layers from
      ``config.predictor.first_llama_layer`` on, by
      :func:`~vljepa_fast.models.load_llama_layers`; ``visual_proj`` and ``head`` stay random.
    * ``y_encoder``: a folder with ``modules.json`` (sentence-transformers, EmbeddingGemma) or
      ``config.json`` (transformers ``Gemma3TextModel``) is loaded by
      :func:`~vljepa_fast.models.load_gemma3_folder` (Dense stack and normalisation from the
      folder; the head to ``embed_dim`` is new); any other file or folder is a Gemma-3 state
      dict for :func:`~vljepa_fast.models.load_gemma3_state_dict` into the built-in encoder.

    A module without a path keeps its random init (the report says so); the Y-decoder always
    does (there is no public checkpoint for it).

    Args:
        config: the model's sizes.
        x_encoder, predictor, y_encoder: local paths, or None.
        backend, query_tokenizer, text_tokenizer: as :class:`~vljepa_fast.models.VLJEPA`.
            A tokenizer left None while the predictor's (Y-encoder's) path is a folder holding
            a transformers tokenizer (``tokenizer.json`` or ``tokenizer_config.json``, as a
            transformers or sentence-transformers download: in a sentence-transformers
            folder, the Transformer module's folder, e.g. ``0_Transformer``, then the folder
            itself) is that folder's, loaded locally and padded with its pad token, else the
            config's ``pad_id`` (the report's notes say so). Meta's ``tokenizer.model`` is not
            read: pass ``query_tokenizer``. When the model refuses a tokenizer found this way,
            the error says where it was found (a tokenizer you passed is not blamed on a
            folder).
        decoder_tokenizer: as :class:`~vljepa_fast.models.VLJEPA`; left None, it is the
            predictor folder's tokenizer when the Y-decoder shares the predictor's vocabulary
            size (the paper preset: Llama's), so ``model.decode`` works on a loaded model.
        strict: what to do when a config file with the weights disagrees with ``config``
            on a size the tensor shapes do not reveal (heads, kv_heads, norm eps, RoPE base
            and scaling, patch, ...): the config files listed above. True: ValueError naming
            the file and each field. False: load anyway; the x_encoder, the predictor and a
            Gemma-3 state dict keep ``config`` (the report's notes list the fields), a
            Y-encoder folder's config builds that encoder (``model.config.y_encoder`` is
            replaced; notes too).
            The Y-encoder's ``max_len`` and ``lr_multiplier`` are always ``config``'s.
            Weights whose keys or shapes do not fit are refused whatever ``strict`` says.

    Returns:
        (model, :class:`PretrainedReport`): per module the path, the layout detected, the
        keys ignored and notes.

    Raises:
        ValueError: a path that is not a string or path; any error of :func:`read_state_dict`
            or of the loaders (missing, unexpected, mis-shaped keys named, with the path); a
            config disagreement under ``strict``.
    """
    if not isinstance(config, VLJEPAConfig):
        raise ValueError(f"config: expected a VLJEPAConfig, got {type(config).__name__}")
    if not isinstance(strict, bool):
        raise ValueError(f"strict: expected a bool, got {strict!r}")
    given = {"x_encoder": x_encoder, "predictor": predictor, "y_encoder": y_encoder}
    paths = {name: None if p is None else as_path(p, name) for name, p in given.items()}
    states: dict[str, dict] = {}
    notes: dict[str, tuple[str, ...]] = {"x_encoder": (), "predictor": (), "y_encoder": ()}
    kinds = {"x_encoder": "vjepa2", "predictor": "llama"}
    for name in ("x_encoder", "predictor"):
        if paths[name] is not None:
            what = f"{name} ({paths[name]})"
            cfg = config.x_encoder if name == "x_encoder" else config.predictor
            notes[name] = _config_notes(what, paths[name], kinds[name], cfg, strict)
            states[name] = _read_for(name, paths[name])
    y_module, y_layout = None, None
    yp = paths["y_encoder"]
    if yp is not None:
        if _is_model_folder(yp):
            yc = config.y_encoder
            try:
                y_module = load_gemma3_folder(
                    yp, config.embed_dim, backend=backend, max_len=yc.max_len,
                    lr_multiplier=yc.lr_multiplier,
                )  # fmt: skip
            except ValueError as e:
                raise ValueError(f"y_encoder ({yp}): {e}") from None
            st = (yp / "modules.json").is_file()
            y_layout = "sentence-transformers" if st else "transformers"
            diffs = _y_encoder_diffs(yc, y_module.cfg)
            if diffs and strict:
                raise ValueError(
                    f"y_encoder ({yp}): the folder's Gemma-3 config disagrees with "
                    "config.y_encoder: "
                    + "; ".join(diffs)
                    + " (fix the config, or pass strict=False to take the folder's)"
                )
            if diffs:
                config = config.replace(y_encoder=y_module.cfg)
                notes["y_encoder"] = tuple(
                    f"config.y_encoder replaced by the folder's: {x}" for x in diffs
                )
            if not diffs:
                model_dir = _st_transformer("y_encoder", yp) or yp
                notes["y_encoder"] += (
                    f"{model_dir / 'config.json'} checked: agrees with the config",
                )
            notes["y_encoder"] += ("head (to embed_dim) keeps its random init",)
        else:
            what = f"y_encoder ({yp})"
            notes["y_encoder"] = _config_notes(what, yp, "gemma3", config.y_encoder, strict)
            states["y_encoder"] = _read_for("y_encoder", yp)
    auto = {}
    for name, arg, tok in (
        ("predictor", "query_tokenizer", query_tokenizer),
        ("y_encoder", "text_tokenizer", text_tokenizer),
        ("predictor", "decoder_tokenizer", decoder_tokenizer),
    ):
        if (
            arg == "decoder_tokenizer"
            and config.y_decoder.vocab_size != config.predictor.vocab_size
        ):
            continue  # the predictor's tokenizer is not the decoder's
        folder = _tokenizer_folder(name, paths[name]) if tok is None else None
        if folder is not None:
            auto[arg] = folder
            notes[name] += (f"{arg}: the tokenizer in {folder} (pass {arg}= for another)",)
    try:
        model = VLJEPA(
            config,
            backend,
            y_encoder=y_module,
            query_tokenizer=auto.get("query_tokenizer", query_tokenizer),
            text_tokenizer=auto.get("text_tokenizer", text_tokenizer),
            decoder_tokenizer=auto.get("decoder_tokenizer", decoder_tokenizer),
        )
    except ValueError as e:
        msg = str(e)  # the model's messages start with the failing argument's name
        failing = [a for a in auto if msg.startswith(a) and msg[len(a) : len(a) + 1] in ":( "]
        if not failing:
            raise
        used = "; ".join(f"{a} is the tokenizer found in {auto[a]}" for a in failing)
        raise ValueError(f"{msg} ({used}: pass {' / '.join(failing)}= to choose)") from None
    reports = {}
    for name in ("x_encoder", "predictor", "y_encoder"):
        p = paths[name]
        if p is None:
            reports[name] = ModuleReport(None, notes=("random init (no path given)",))
            continue
        try:
            if name == "x_encoder":
                res = load_vjepa2_state_dict(model.x_encoder, states[name])
                layout, ignored = res.layout, res.ignored
            elif name == "predictor":
                res = load_llama_layers(model.predictor, states[name])
                layout, ignored = res.layout, res.ignored
                notes[name] += ("visual_proj and head keep their random init",)
            elif y_module is not None:
                layout, ignored = y_layout, ()
            else:
                state = states[name]
                load_gemma3_state_dict(model.y_encoder, state)
                layout = "vljepa_fast" if "head.weight" in state else "transformers"
                ignored = ("lm_head.weight",) if "lm_head.weight" in state else ()
                for part in ("dense", "head"):
                    if len(getattr(model.y_encoder, part).state_dict()) and not any(
                        k.startswith(part + ".") for k in state
                    ):
                        notes[name] += (f"{part} keeps its random init",)
        except ValueError as e:
            raise ValueError(f"{name} ({p}): {e}") from None
        reports[name] = ModuleReport(p, layout, tuple(ignored), notes[name])
    return model, PretrainedReport(**reports)
