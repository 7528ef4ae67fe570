"""cpu tier (one case gpu): the native code's shared pieces have one owner each.

* The normalisation epsilon is defined once in C++ (csrc/include/vljepa_common.h) and equals its
  Python owner, ``vljepa_fast.reference.NORM_EPS``; the compiled kernels apply that value.
* The CUDA device helpers live in csrc/include/vljepa_cuda.h only, and the native argument checks
  (their messages) in csrc/include/*_check.h only.
* The build fingerprint (vljepa_fast/_ext.py) covers every header a native source includes, so
  an edit to a shared header rebuilds the library instead of loading a stale one.
* The Meta (shape) functions refuse a bad call with the message of the CPU kernel, word for word.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from vljepa_fast import _ext, reference

CSRC = Path(__file__).resolve().parent.parent / "csrc"
INCLUDE = CSRC / "include"
NATIVE_SUFFIXES = {".cpp", ".cu", ".h", ".cuh"}


def _native_files() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in NATIVE_SUFFIXES)


def _code(path: Path) -> str:
    """The file without its comments (none of the native sources has // or /* in a string)."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


# ------------------------------------------------------------------------------------ epsilon


def test_norm_eps_is_the_reference_value():
    code = _code(INCLUDE / "vljepa_common.h")
    eps = re.findall(r"constexpr\s+float\s+kNormEps\s*=\s*([0-9.eE+-]+)f\s*;", code)
    assert len(eps) == 1, "vljepa_common.h must define kNormEps once, as a float literal"
    assert float(eps[0]) == reference.NORM_EPS
    # the threshold of the zero-row gradient rule is derived from it, not restated
    assert re.search(r"constexpr\s+float\s+kInvNormEps\s*=\s*1\.0f\s*/\s*kNormEps\s*;", code)


def test_norm_eps_has_one_native_owner():
    owner = INCLUDE / "vljepa_common.h"
    literal = re.compile(r"(?<![\w.])1(\.0*)?[eE]-0*12f?(?![\w.])")
    definition = re.compile(r"\b(kNormEps|kInvNormEps)\s*=")
    for path in _native_files():
        if path == owner:
            continue
        code = _code(path)
        assert not literal.search(code), f"{path.relative_to(CSRC)} restates 1e-12: use kNormEps"
        assert not definition.search(code), f"{path.relative_to(CSRC)} redefines the epsilon"


@pytest.fixture(scope="module")
def cpu_lib():
    st = _ext.load("cpu")
    assert st.loaded, "native cpu library unavailable: " + "; ".join(st.reasons)


def _require_lib(device: str) -> None:
    st = _ext.load("cuda" if device == "cuda" else "cpu")
    assert st.loaded, f"native {device} library unavailable: " + "; ".join(st.reasons)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _unit64(x: torch.Tensor) -> torch.Tensor:
    """Rows of x divided by max(norm, NORM_EPS), in float64."""
    x = x.double()
    return x / x.norm(dim=1, keepdim=True).clamp_min(reference.NORM_EPS)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_clamp_norms_at_reference_eps(device):
    """A row of norm 1e-13 (below eps) is divided by eps, not by its norm: its cosine with a unit
    row is 0.1, which pins the compiled epsilon to the reference's (1e-11 would give 0.01, no
    clamp 1.0)."""
    _require_lib(device)
    tiny = reference.NORM_EPS / 10
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]], device=device)
    bank = torch.tensor(
        [[tiny, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, tiny, 0.0, 0.0]],
        device=device,
    )
    want = _unit64(q.cpu()) @ _unit64(bank.cpu()).T
    assert want[0, 0] == pytest.approx(0.1, rel=1e-6)  # the reference rule itself (fp32 tiny)
    scores, idx = torch.ops.vljepa_fast.topk_similarity(q, bank, 4, True)
    torch.testing.assert_close(
        scores.cpu().double(), want.gather(1, idx.cpu()), rtol=1e-6, atol=1e-7
    )
    assert idx.cpu().tolist() == [[1, 0, 2, 3], [3, 0, 1, 2]]

    scale = torch.tensor(10.0)
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, tiny, 0.0, 0.0]], device=device)
    row_lse, col_lse, pos_row, pos_col = torch.ops.vljepa_fast.infonce_fwd(
        a, bank, scale, 0, True, True
    )
    s = 10.0 * _unit64(a.cpu()) @ _unit64(bank.cpu()).T
    torch.testing.assert_close(pos_row.cpu().double(), s[[0, 1], [0, 1]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row_lse.cpu(), torch.logsumexp(s, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(col_lse.cpu(), torch.logsumexp(s, 0), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ one owner per piece

# Every CUDA device helper, and the constants of the operand staging, defined in vljepa_cuda.h.
CUDA_HELPERS = [
    "to_float", "from_float", "warp_max", "warp_sum", "load_pack", "fma_step", "fma_store",
    "wmma_step", "wmma_store", "inv_norm_kernel", "inverse_norms",
]  # fmt: skip
CUDA_CONSTANTS = ["kFullMask", "kPackBytes", "kPacksPerRow", "kOperandPitch"]


def _definitions(code: str, name: str) -> int:
    """Function definitions of `name` (templates and specialisations included) in code."""
    return len(re.findall(rf"\b{name}\s*(?:<[\w\s,:]*>)?\s*\([^;{{}}]*\)\s*\{{", code))


def test_cuda_device_helpers_have_one_owner():
    owner = INCLUDE / "vljepa_cuda.h"
    owned = _code(owner)
    for name in CUDA_HELPERS:
        assert _definitions(owned, name) >= 1, f"vljepa_cuda.h lost {name}"
    for name in CUDA_CONSTANTS:
        assert len(re.findall(rf"constexpr\s+\w+\s+{name}\s*=", owned)) == 1, name
    cu_files = sorted((CSRC / "cuda").glob("*.cu"))
    assert cu_files
    for path in _native_files():
        if path == owner:
            continue
        code = _code(path)
        for name in CUDA_HELPERS:
            assert _definitions(code, name) == 0, f"{path.relative_to(CSRC)} redefines {name}"
        for name in CUDA_CONSTANTS:
            assert not re.search(rf"constexpr\s+\w+\s+{name}\s*=", code), (path, name)
    # every file that defines kernels (a .cu, or a kernels header such as attention_kernels.h,
    # whose instantiation units define none themselves) takes the helpers from vljepa_cuda.h
    kernel_files = [p for p in [*cu_files, *INCLUDE.glob("*.h")] if "__global__" in _code(p)]
    assert kernel_files
    for path in kernel_files:
        if path != owner:
            assert '#include "vljepa_cuda.h"' in path.read_text(), path


# The text of each shared check, written once (vljepa_check.h) and used by every kernel and Meta
# function through the op headers.
SHARED_MESSAGES = [
    '" must be on "',
    '" must be contiguous"',
    '"-D, got shape "',
    '" must be float32, float16 or bfloat16, got "',
    '" must match "',
    '" must have the same feature size, got "',
    '" need at least one feature column, got "',
    '" must be on the same device, got "',
    '": sizes must be below 2^30, got "',
]
OP_MESSAGES = {
    "infonce_check.h": [
        '"scale must be a one-element floating tensor, got "',
        '"a must have at least one row, got "',
        '"offset must be in [0, M - N] = [0, "',
        '"scale must be on the cpu or on "',
        '" must be a floating ["',
        '"col_lse is required when g_col is given"',
    ],
    "topk_similarity_check.h": ['"k must be in [1, N="'],
}


def test_native_checks_have_one_owner():
    codes = {p: _code(p) for p in _native_files()}
    owners = {msg: "vljepa_check.h" for msg in SHARED_MESSAGES}
    owners.update({msg: header for header, msgs in OP_MESSAGES.items() for msg in msgs})
    for msg, header in owners.items():
        where = [p.relative_to(CSRC).as_posix() for p, code in codes.items() if msg in code]
        assert where == [f"include/{header}"], f"{msg} is written in {where}"
    # the kernels and Meta functions check through those headers, not with their own macros
    for path, code in codes.items():
        assert "VF_CHECK_" not in code, path


# ------------------------------------------------------------------------ build fingerprint


def _included_headers(source: Path, root: Path) -> set[Path]:
    """Every project header `source` includes, directly or through other headers."""
    seen: set[Path] = set()
    todo = [source]
    while todo:
        path = todo.pop()
        for name in re.findall(r'^\s*#include\s+"([^"]+)"', path.read_text(), flags=re.M):
            for cand in (path.parent / name, root / "include" / name):
                if cand.is_file():
                    if cand not in seen:
                        seen.add(cand)
                        todo.append(cand)
                    break
            else:
                raise AssertionError(f"{path}: included {name!r} not found")
    return seen


@pytest.mark.parametrize("lib", _ext.LIBS)
def test_fingerprint_covers_every_included_header(lib, tmp_path, monkeypatch):
    root = tmp_path / "csrc"
    shutil.copytree(CSRC, root)
    monkeypatch.setattr(_ext, "source_root", lambda: root)
    base = _ext._fingerprint(lib)["source_hash"]
    headers = set().union(*(_included_headers(src, root) for src in _ext.sources(lib)))
    assert root / "include" / "vljepa_common.h" in headers
    for header in sorted(headers):
        text = header.read_text()
        header.write_text(text + "\n// edited\n")
        assert _ext._fingerprint(lib)["source_hash"] != base, (
            f"editing {header.relative_to(root)} leaves the {lib} build fingerprint unchanged"
        )
        header.write_text(text)
    assert _ext._fingerprint(lib)["source_hash"] == base


# ------------------------------------------------------------------- Meta refuses like the CPU

_N, _M, _D = 3, 5, 4


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _topk(q=None, bank=None, k=2):
    return "topk_similarity", (
        _rand(_N, _D) if q is None else q,
        _rand(_M, _D) if bank is None else bank,
        k,
        True,
    )


def _fwd(a=None, b=None, scale=None, offset=1):
    return "infonce_fwd", (
        _rand(_N, _D) if a is None else a,
        _rand(_M, _D) if b is None else b,
        torch.tensor(10.0) if scale is None else scale,
        offset,
        True,
        True,
    )


def _bwd(row_lse=None, col_lse=..., g_row=None, g_col=..., offset=1):
    return "infonce_bwd", (
        _rand(_N, _D),
        _rand(_M, _D),
        torch.tensor(10.0),
        offset,
        True,
        _rand(_N) if row_lse is None else row_lse,
        _rand(_M) if col_lse is ... else col_lse,
        _rand(_N) if g_row is None else g_row,
        _rand(_M) if g_col is ... else g_col,
    )


# case: (call, the argument its message names first)
BAD_CALLS = {
    "topk_queries_1d": (lambda: _topk(q=_rand(_D)), "queries"),
    "topk_bank_3d": (lambda: _topk(bank=_rand(1, _M, _D)), "bank"),
    "topk_float64": (lambda: _topk(q=_rand(_N, _D).double(), bank=_rand(_M, _D).double()),
                     "queries"),
    "topk_int": (lambda: _topk(q=torch.ones(_N, _D, dtype=torch.int32),
                               bank=torch.ones(_M, _D, dtype=torch.int32)), "queries"),
    "topk_bank_dtype": (lambda: _topk(bank=_rand(_M, _D, dtype=torch.bfloat16)), "bank"),
    "topk_queries_transposed": (lambda: _topk(q=_rand(_D, _N).T), "queries"),
    "topk_bank_transposed": (lambda: _topk(bank=_rand(_D, _M).T), "bank"),
    "topk_feature_size": (lambda: _topk(bank=_rand(_M, _D + 1)), "queries"),
    "topk_no_features": (lambda: _topk(q=_rand(_N, 0), bank=_rand(_M, 0)), "queries"),
    "topk_k_zero": (lambda: _topk(k=0), "k"),
    "topk_k_above_n": (lambda: _topk(k=_M + 1), "k"),
    "fwd_a_1d": (lambda: _fwd(a=_rand(_D)), "a"),
    "fwd_b_dtype": (lambda: _fwd(b=_rand(_M, _D, dtype=torch.float16)), "b"),
    "fwd_float64": (lambda: _fwd(a=_rand(_N, _D).double(), b=_rand(_M, _D).double()), "a"),
    "fwd_b_transposed": (lambda: _fwd(b=_rand(_D, _M).T), "b"),
    "fwd_feature_size": (lambda: _fwd(b=_rand(_M, _D - 1)), "a"),
    "fwd_no_features": (lambda: _fwd(a=_rand(_N, 0), b=_rand(_M, 0)), "a"),
    "fwd_no_rows": (lambda: _fwd(a=_rand(0, _D)), "a"),
    "fwd_scale_two": (lambda: _fwd(scale=torch.ones(2)), "scale"),
    "fwd_scale_int": (lambda: _fwd(scale=torch.tensor(10)), "scale"),
    "fwd_offset_past": (lambda: _fwd(offset=_M - _N + 1), "offset"),
    "fwd_offset_wraps": (lambda: _fwd(offset=2**63 - 1), "offset"),
    "bwd_offset_negative": (lambda: _bwd(offset=-1), "offset"),
    "bwd_row_lse_short": (lambda: _bwd(row_lse=_rand(_N - 1)), "row_lse"),
    "bwd_g_row_int": (lambda: _bwd(g_row=torch.ones(_N, dtype=torch.int64)), "g_row"),
    "bwd_col_lse_missing": (lambda: _bwd(col_lse=None), "col_lse"),
    "bwd_col_lse_short": (lambda: _bwd(col_lse=_rand(_M - 1)), "col_lse"),
    "bwd_g_col_2d": (lambda: _bwd(g_col=_rand(_M, 1)), "g_col"),
}  # fmt: skip


def _meta(x):
    if not isinstance(x, torch.Tensor):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _refusal(op: str, args: tuple) -> str:
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.vljepa_fast, op)(*args)
    return str(info.value).split("\nException raised from")[0].strip()


@pytest.mark.parametrize("case", BAD_CALLS)
def test_meta_refuses_with_the_cpu_message(case, cpu_lib):
    make, name = BAD_CALLS[case]
    op, args = make()
    on_cpu = _refusal(op, args)
    on_meta = _refusal(op, tuple(_meta(x) for x in args))
    assert on_meta == on_cpu
    assert re.match(rf"{name}\b", on_cpu), f"the message does not start with {name!r}: {on_cpu}"


def test_meta_shapes_follow_the_contract(cpu_lib):
    """The Meta functions' outputs: shapes and dtypes of the schema comments in csrc/ops.cpp."""
    ops = torch.ops.vljepa_fast
    op, args = _topk(k=3)
    scores, idx = ops.topk_similarity(*map(_meta, args))
    assert (tuple(scores.shape), scores.dtype) == ((_N, 3), torch.float32)
    assert (tuple(idx.shape), idx.dtype) == ((_N, 3), torch.int64)
    for col_stats in (True, False):
        op, args = _fwd()
        out = ops.infonce_fwd(*map(_meta, args[:5]), col_stats)
        m = _M if col_stats else 0
        assert [(tuple(t.shape), t.dtype) for t in out] == [
            ((_N,), torch.float64), ((m,), torch.float64), ((_N,), torch.float32),
            ((m,), torch.float32),
        ]  # fmt: skip
    op, args = _bwd()
    da, db, dscale = ops.infonce_bwd(*map(_meta, args))
    assert [(tuple(t.shape), t.dtype) for t in (da, db, dscale)] == [
        ((_N, _D), torch.float32), ((_M, _D), torch.float32), ((), torch.float32),
    ]  # fmt: skip


# ------------------------------------------------------------------ build environment variables


def test_empty_build_variables_count_as_unset(monkeypatch, tmp_path):
    """An empty VLJEPA_FAST_BUILD_DIR / VLJEPA_FAST_CUDA_ARCHS / CUDA_HOME is unset, never the
    working directory (regression: Path("") built into the current folder)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLJEPA_FAST_BUILD_DIR", "")
    assert _ext.build_dir("cpu").is_absolute()
    monkeypatch.setenv("VLJEPA_FAST_CUDA_ARCHS", "")
    assert _ext.cuda_archs() == _ext.DEFAULT_CUDA_ARCHS
    monkeypatch.setenv("CUDA_HOME", "")
    home = _ext.find_cuda_home()
    assert home is None or home.resolve() != tmp_path.resolve()


@pytest.mark.parametrize(
    "value, on",
    [
        ("0", False),
        ("false", False),
        ("OFF", False),
        ("no", False),
        ("1", True),
        ("yes", True),
        ("", True),
    ],
)
def test_auto_build_switch_reads_booleans(monkeypatch, value, on):
    monkeypatch.setenv("VLJEPA_FAST_BUILD", value)
    assert _ext.auto_build_enabled() is on
