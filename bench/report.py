"""Markdown report and PNG charts from pytest-benchmark JSON files of bench/.

    python bench/report.py RUN.json [OTHER.json] [--out DIR] [--no-charts]

Writes DIR/report.md (default DIR: bench/out/) with, per op and shape, every provider's median
time, speedup over the eager reference, peak extra memory, TFLOP/s, GB/s and fraction of the
roofline, the skipped providers and the FLOP formulas; and per op DIR/<op>_speedup.png and
DIR/<op>_memory.png (not with --no-charts, which needs no matplotlib: scripts/gpu_run.py uses it
on a machine without). Given two files, it adds a comparison (OTHER's median over RUN's, per case
and provider present in both).

Only the standard library is imported at load (matplotlib when the charts are drawn), so that
scripts/gpu_run.py, which must run on a bare Python, can import this module.

The same table, as text, is the closing summary of ``pytest bench/`` (:func:`summary_lines`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

REFERENCE = "reference"
#: the provider an op's "vs eager" column divides by, where it is not REFERENCE: the training
#: step (bench_train.py) is measured against the peers' recipe
REFERENCES = {"train": "peers"}


def reference_of(op: str) -> str:
    return REFERENCES.get(op, REFERENCE)


def fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    for unit, mult in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if s * mult >= 1.0:
            return f"{s * mult:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    if abs(b) >= 1 << 30:
        return f"{b / (1 << 30):.2f} GiB"
    return f"{b / (1 << 20):.1f} MiB"


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _groups(rows: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows that ran, by (op, case) in order of appearance."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "median_s" in r:
            out.setdefault((r["op"], r["case"]), []).append(r)
    return out


def table(rows: Iterable[dict]) -> list[list[str]]:
    """Header plus one line of cells per provider that ran, grouped by op and case."""
    out = [
        [
            "op",
            "case",
            "provider",
            "median",
            "vs eager",
            "peak extra",
            "TFLOP/s",
            "GB/s",
            "roofline",
            "H200 model",
        ]
    ]
    for (op, case), group in _groups(rows).items():
        base = reference_of(op)
        ref = next((r["median_s"] for r in group if r["provider"] == base), None)
        for r in group:
            speed = f"{ref / r['median_s']:.2f}x" if ref and r["median_s"] else "-"
            roof = "n/a" if r.get("roofline") is None else f"{100 * r['roofline']:.1f}%"
            # the design's predicted H200 time, and measured / predicted on a CUDA run
            pred = r.get("predicted_s")
            model = "-" if pred is None else fmt_time(pred)
            if pred and r.get("ceiling_note", "").startswith("published ceiling of H200"):
                model += f" ({r['median_s'] / pred:.2f}x)"
            out.append(
                [
                    op,
                    case,
                    r["provider"],
                    fmt_time(r["median_s"]),
                    speed,
                    fmt_bytes(r.get("peak_extra_bytes")),
                    _num(r.get("tflops"), ".3g"),
                    _num(r.get("gbs"), ".3g"),
                    roof,
                    model,
                ]
            )
    return out


def memory_fit(points: list[tuple[int, int]], budget: int) -> dict | None:
    """peak = a + b * batch through the two largest measured batches, and the largest batch
    that fits ``budget`` bytes: floor((budget - a) / b). None with fewer than two batches.
    Extrapolated: only the two points are measured (None when peak does not grow with batch).
    """
    by_batch = dict(sorted(points))
    if len(by_batch) < 2:
        return None
    (b1, p1), (b2, p2) = list(by_batch.items())[-2:]
    slope = (p2 - p1) / (b2 - b1)
    a = p1 - slope * b1
    fits = math.floor((budget - a) / slope) if slope > 0 else None
    return {"a": a, "b": slope, "batches": (b1, b2), "max_batch": fits, "budget": budget}


def train_table(rows: Iterable[dict]) -> list[list[str]]:
    """The training-step rows: samples/s, peak memory, the ratios to the peers' recipe at the
    same case, and per (config, provider) the largest global batch that fits the budget,
    extrapolated from the two batches measured."""
    rows = [r for r in rows if r.get("op") == "train" and "median_s" in r]
    points: dict[tuple, list[tuple[int, int]]] = {}
    for r in rows:
        if r.get("peak_bytes") is not None:
            key = (r["config"], r["provider"], r.get("device_type"))
            points.setdefault(key, []).append((r["batch"], r["peak_bytes"]))
    out = [["case", "provider", "samples/s", "x peers", "peak", "x peers", "step extra",
            "fits (extrapolated)"]]  # fmt: skip
    for (_, case), group in _groups(rows).items():
        peers = next((r for r in group if r["provider"] == "peers"), None)
        for r in group:
            fit = memory_fit(points.get((r["config"], r["provider"], r.get("device_type")), []),
                             r["memory_budget_bytes"])  # fmt: skip
            fits = "-"
            if fit is not None and fit["max_batch"] is not None:
                b1, b2 = fit["batches"]
                fits = f"B {fit['max_batch']} in {fmt_bytes(fit['budget'])} (from B{b1}, B{b2})"
            speed = mem = "-"
            if peers is not None:
                speed = f"{r['samples_per_s'] / peers['samples_per_s']:.2f}x"
                if peers.get("peak_bytes") and r.get("peak_bytes") is not None:
                    mem = f"{r['peak_bytes'] / peers['peak_bytes']:.2f}x"
            out.append([case, r["provider"], f"{r['samples_per_s']:.3g}", speed,
                        fmt_bytes(r.get("peak_bytes")), mem, fmt_bytes(r.get("peak_extra_bytes")),
                        fits])  # fmt: skip
    return out if len(out) > 1 else []


def skipped(rows: Iterable[dict], kind: str = "skipped") -> list[str]:
    """'op provider: reason (n cases)' for every distinct skip (or failure: kind "failed")."""
    count: dict[tuple[str, str, str], int] = {}
    for r in rows:
        if kind in r:
            key = (r["op"], r["provider"], r[kind])
            count[key] = count.get(key, 0) + 1
    return [f"{op} {prov}: {why} ({n} case{'s' * (n > 1)})" for (op, prov, why), n in count.items()]


def summary_lines(rows: list[dict]) -> list[str]:
    """The closing summary of a bench run: the aligned table, then the skips."""
    cells = table(rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    right = {3, 4, 5, 6, 7, 8, 9}
    lines = []
    prev = None
    for n, line in enumerate(cells):
        key = tuple(line[:2])
        if n > 1 and key != prev:
            lines.append("")
        prev = key
        lines.append(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths))
            ).rstrip()
        )
    if len(cells) == 1:
        lines.append("(no case ran)")
    if any(r.get("roofline") is None for r in rows if "median_s" in r):
        lines.append(
            "roofline n/a: no published ceiling for this device (CPU, or a GPU not in "
            "bench/_harness.py CEILINGS)"
        )
    train = train_table(rows)
    if train:
        widths = [max(len(line[i]) for line in train) for i in range(len(train[0]))]
        lines += ["", "training step (x peers: ours over the peers' recipe, same case):"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in train]
    for kind in ("failed", "skipped"):
        found = skipped(rows, kind)
        if found:
            lines += ["", f"{kind}:"] + [f"  {s}" for s in found]
    return lines


# ------------------------------------------------------------------------------------------
# JSON in, markdown and charts out
# ------------------------------------------------------------------------------------------


def load(path: str | Path) -> dict:
    """A --benchmark-json file as {"rows": [...], "meta": {...}}."""
    data = json.loads(Path(path).read_text())
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        rows.append(dict(info, median_s=b["stats"]["median"]))
    extra = data.get("vljepa_fast", {})
    rows.extend(extra.get("skipped", []))
    rows.extend(extra.get("failed", []))
    meta = {
        "datetime": data.get("datetime"),
        "path": str(path),
        "machine": data.get("machine_info", {}).get("vljepa_fast", {}),
        "preset": extra.get("preset"),
        "commit": data.get("commit_info", {}).get("id"),
    }
    return {"rows": rows, "meta": meta}


def _md_table(cells: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    out.extend("| " + " | ".join(c) + " |" for c in cells[1:])
    return out


def _describe(meta: dict) -> list[str]:
    m = meta.get("machine", {})
    dev = m.get("device", {})
    lines = [f"- file: `{meta['path']}`, date {meta.get('datetime')}, preset {meta.get('preset')}"]
    if dev:
        desc = ", ".join(f"{k} {v}" for k, v in dev.items() if k != "type")
        lines.append(f"- device ({dev.get('type')}): {desc}")
    if m.get("measured_ceilings"):
        lines.append(f"- measured ceilings: {m['measured_ceilings']}")
    if m.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    return lines


def charts(rows: list[dict], out: Path) -> list[Path]:
    """Per op: speedup over eager and peak extra memory, one bar per provider and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_op: dict[str, dict[str, list[dict]]] = {}
    for (op, case), group in _groups(rows).items():
        by_op.setdefault(op, {})[case] = group
    for op, cases in by_op.items():
        labels = list(cases)
        providers = list(dict.fromkeys(r["provider"] for g in cases.values() for r in g))
        for kind in ("speedup", "memory"):
            fig, ax = plt.subplots(
                figsize=(max(6.0, 1.1 * len(labels) * max(1, len(providers)) / 3), 4.5)
            )
            width = 0.8 / max(1, len(providers))
            for j, prov in enumerate(providers):
                vals = []
                for case in labels:
                    g = cases[case]
                    r = next((x for x in g if x["provider"] == prov), None)
                    base = reference_of(op)
                    ref = next((x["median_s"] for x in g if x["provider"] == base), None)
                    if r is None:
                        vals.append(math.nan)
                    elif kind == "speedup":
                        vals.append(ref / r["median_s"] if ref else math.nan)
                    else:
                        peak = r.get("peak_extra_bytes")
                        vals.append(math.nan if peak is None else max(peak, 1) / (1 << 20))
                xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(labels))]
                ax.bar(xs, vals, width, label=prov)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
            if kind == "speedup":
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_ylabel("speedup over eager reference (x)")
            else:
                ax.set_yscale("log")
                ax.set_ylabel("peak extra memory (MiB, log)")
            ax.set_title(f"{op}: {kind}")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{op}_{kind}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def compare(a: dict, b: dict) -> list[str]:
    """Markdown lines: B's median over A's for every (op, case, provider) present in both."""
    index = {(r["op"], r["case"], r["provider"]): r for r in a["rows"] if "median_s" in r}
    cells = [["op", "case", "provider", "median A", "median B", "B / A"]]
    for r in b["rows"]:
        key = (r["op"], r["case"], r["provider"])
        if "median_s" not in r or key not in index:
            continue
        ta, tb = index[key]["median_s"], r["median_s"]
        cells.append([*key, fmt_time(ta), fmt_time(tb), f"{tb / ta:.2f}"])
    lines = [
        "## Comparison",
        "",
        f"A: `{a['meta']['path']}`; B: `{b['meta']['path']}`; B / A < 1 means B is faster.",
        "",
    ]
    if len(cells) == 1:
        return lines + ["No case and provider appears in both runs."]
    return lines + _md_table(cells)


def markdown(run: dict, images: list[Path], other: dict | None = None) -> str:
    rows = run["rows"]
    lines = ["# vljepa_fast benchmark report", "", *_describe(run["meta"]), ""]
    ops = list(dict.fromkeys(r["op"] for r in rows if "median_s" in r))
    cells = table(rows)
    for op in ops:
        lines += [f"## {op}", ""]
        lines += _md_table([cells[0]] + [c for c in cells[1:] if c[0] == op])
        formula = next((r.get("formula") for r in rows if r["op"] == op and r.get("formula")), None)
        if formula:
            lines += [
                "",
                f"FLOPs and bytes: {formula}. Peak extra memory: "
                + next(r.get("peak_method", "") for r in rows if r["op"] == op and "median_s" in r)
                + ".",
            ]
        if op == "train" and train_table(rows):
            lines += ["", "Training step: samples/s and peak memory against the peers' recipe; "
                      "the batch that fits is extrapolated from two measured points "
                      "(peak = a + b * batch).", ""]  # fmt: skip
            lines += _md_table(train_table(rows))
        lines.append("")
        lines += [f"![{p.stem}]({p.name})" for p in images if p.name.startswith(op + "_")]
        lines.append("")
    for kind in ("failed", "skipped"):
        found = skipped(rows, kind)
        if found:
            lines += [f"## {kind.capitalize()}", ""] + [f"- {s}" for s in found] + [""]
    if other is not None:
        lines += compare(run, other) + [""]
        lines += ["### Second run", "", *_describe(other["meta"]), ""]
    return "\n".join(lines)


def command_line(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help shows ``doc`` (a module docstring with a usage block) as written.

    The command lines of this module and of scripts/gpu_run.py.
    """
    return argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def main(argv: list[str] | None = None) -> int:
    ap = command_line("python bench/report.py", __doc__)
    ap.add_argument("runs", nargs="+", help="one --benchmark-json file, or two to compare")
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "out"),
        help="output folder (default: bench/out/)",
    )
    ap.add_argument(
        "--no-charts", action="store_true", help="report.md only (matplotlib not needed)"
    )
    args = ap.parse_args(argv)
    if len(args.runs) > 2:
        ap.error("give one JSON file, or two to compare")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = load(args.runs[0])
    other = load(args.runs[1]) if len(args.runs) == 2 else None
    images = [] if args.no_charts else charts(run["rows"], out)
    text = markdown(run, images, other)
    if args.no_charts:
        text += "\n(no charts: --no-charts)\n"
    path = out / "report.md"
    path.write_text(text)
    print(f"wrote {path} and {len(images)} charts in {out}")
    for line in summary_lines(run["rows"]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
