"""The ``auto`` rule of attention on CUDA (vljepa_fast/ops/attention_auto.py), on CPU.

Inputs that report a CUDA device (CPU tensors inside) stand in for GPU inputs; the GPU's compute
capability, the installed peers and the records' availability are monkeypatched, so the rule's
choice is checked for every case of its table: the order ``auto`` asks in, the backend
``select`` then takes, the text of ``explain`` and ``vf.backends()``. Named backends and the
environment overrides do not consult the rule. Whether the rule picks the fastest kernel is a
GPU question: the GPU run's attention benchmark answers it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import vljepa_fast as vf
from vljepa_fast import _backends
from vljepa_fast.ops import attention as ops
from vljepa_fast.ops import attention_auto, attention_peers

pytestmark = pytest.mark.cpu

CUDA = torch.device("cuda")


@dataclass(frozen=True, eq=False)
class _CudaInputs(ops.AttentionInputs):
    """AttentionInputs that say they live on a CUDA device."""

    @property
    def device(self) -> torch.device:
        return CUDA


@dataclass(frozen=True, eq=False)
class _CudaVarlen(ops.VarlenInputs):
    @property
    def device(self) -> torch.device:
        return CUDA


@pytest.fixture(autouse=True)
def _gpu(monkeypatch):
    """A Hopper GPU, every record available, no FA3, no environment override."""
    for name in list(os.environ):
        if name.startswith("VLJEPA_FAST_BACKEND"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_backends, "_probe", lambda op, name: ())
    fa3 = {"installed": False}
    real = attention_peers._import_reasons

    def reasons(module):
        if module == attention_peers.FA3:
            return [] if fa3["installed"] else [f"{module} is not installed"]
        return real(module)

    monkeypatch.setattr(attention_peers, "_import_reasons", reasons)
    return fa3


def _dense(dtype=torch.bfloat16, lengths=None, mask_queries=False, **kw):
    q = torch.randn(2, 8, 4, 64, dtype=dtype)
    k = torch.randn(2, 8, 2, 64, dtype=dtype)
    mask = None if lengths is None else torch.arange(8)[None] < torch.tensor(lengths)[:, None]
    x = ops.attention_inputs(q, k, k, key_padding_mask=mask, mask_queries=mask_queries, **kw)
    return _CudaInputs(**{f: getattr(x, f) for f in x.__dataclass_fields__})


def _varlen(dtype=torch.bfloat16):
    q = torch.randn(8, 4, 64, dtype=dtype)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    x = ops.varlen_inputs(q, q[:, :2], q[:, :2], cu, cu, 5, 5)
    return _CudaVarlen(**{f: getattr(x, f) for f in x.__dataclass_fields__})


def _order(op, x):
    recs, reason = _backends.auto_order(op, x)
    return [r.name for r in recs], reason


def _want(names):
    """The rule's names that are registered here, then the other auto records by priority."""
    have = [r.name for r in _backends.records("attention")]
    first = [n for n in names if n in have]
    return first + [n for n in have if n not in first]


@pytest.mark.parametrize(
    "case, make, names, why",
    [
        ("padded", lambda: _dense(lengths=[8, 5]), attention_auto.PADDED, "key_padding_mask on"),
        ("padded-mask-queries", lambda: _dense(lengths=[8, 5], mask_queries=True),
         attention_auto.PADDED, "key_padding_mask with mask_queries"),
        ("fp32-padded", lambda: _dense(torch.float32, lengths=[8, 5]), attention_auto.PADDED,
         "key_padding_mask"),
        ("fp32", lambda: _dense(torch.float32), attention_auto.FLOAT32, "float32"),
        ("bf16", lambda: _dense(), attention_auto.HALF, "16-bit"),
        ("fp16-causal-window", lambda: _dense(torch.float16, causal=True, window_size=(3, -1)),
         attention_auto.HALF, "16-bit"),
    ],
)  # fmt: skip
def test_the_rule_orders_the_records(case, make, names, why):
    x = make()
    got, reason = _order("attention", x)
    assert got == _want(names) and got[-1] == "reference", case
    assert why in reason, reason


def test_deterministic_mode_and_varlen(monkeypatch):
    got, reason = _order("attention_varlen", _varlen())
    assert got[0] == "flash_attn" and "16-bit" in reason
    assert _order("attention_varlen", _varlen(torch.float32))[0][0] == "triton"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    for x, op in ((_dense(), "attention"), (_varlen(), "attention_varlen")):
        got, reason = _order(op, x)
        assert got == _want(attention_auto.DETERMINISTIC) and "deterministic" in reason
    # key padding comes first, deterministic or not
    assert "key_padding_mask" in _order("attention", _dense(lengths=[8, 5]))[1]


def test_fa3_named_in_the_reason_when_it_serves(_gpu, monkeypatch):
    assert "flash-attn 2" in _order("attention", _dense())[1]
    _gpu["installed"] = True
    assert "FlashAttention-3" in _order("attention", _dense())[1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "flash-attn 2" in _order("attention", _dense())[1]  # FA3 is Hopper only


def test_cpu_inputs_keep_the_priority_order():
    q = torch.randn(1, 4, 2, 8)
    x = ops.attention_inputs(q, q, q, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    got, reason = _order("attention", x)
    assert got == ["sdpa", "reference"] and reason == "priority order"
    assert _backends.select("attention", "auto", x)[0].name == "sdpa"


def test_select_takes_the_first_record_of_the_rule_that_accepts(monkeypatch):
    """The rule only orders: a record it puts first that refuses is passed over."""
    padded = _dense(lengths=[8, 5])
    rec, plan = _backends.select("attention", "auto", padded)
    assert rec.name == "triton" and plan.tolist() == [8, 5]
    rec, _ = _backends.select("attention", "auto", _dense(torch.float32))
    assert rec.name == "triton"
    assert _backends.select("attention", "auto", _dense())[0].name == "flash_attn"
    odd = _dense(torch.float16)  # head dim 64 served; make triton refuse by a scattered mask
    holes = ops.attention_inputs(
        odd.q, odd.k, odd.v, key_padding_mask=torch.tensor([[1, 0] * 4] * 2).bool()
    )
    holes = _CudaInputs(**{f: getattr(holes, f) for f in holes.__dataclass_fields__})
    assert _backends.select("attention", "auto", holes)[0].name == "flash_attn"


def test_named_backends_and_overrides_ignore_the_rule(monkeypatch):
    x = _dense(lengths=[8, 5])
    assert _backends.select("attention", "sdpa", x)[0].name == "sdpa"
    assert _backends.select("attention", {"attention": "xformers"}, x)[0].name == "xformers"
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "sdpa")
    assert _backends.select("attention", "auto", x)[0].name == "sdpa"
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "auto")
    assert _backends.select("attention", "auto", x)[0].name == "triton"


def test_explain_and_backends_state_the_rule():
    text = _backends.explain("attention", _dense(lengths=[8, 5], mask_queries=True))
    first = text.splitlines()[0]
    assert first.startswith("  auto picks triton (asks triton, ")
    assert "key_padding_mask with mask_queries on the dense API" in first
    assert (
        _backends.explain("attention", _dense())
        .splitlines()[0]
        .startswith("  auto picks flash_attn (asks flash_attn, triton, ")
    )
    assert attention_auto.RULE_TEXT in _backends.explain("attention")
    rows = vf.backends()
    for r in rows:
        want = attention_auto.RULE_TEXT if r.op.startswith("attention") else "priority order"
        assert r.auto_rule == want, r
