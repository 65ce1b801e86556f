"""Render result JSON files as Markdown tables and one PNG figure each.

``python -m benchmarks report [FILES...]`` (default: the newest complete quick/full result per
device in ``benchmarks/results/``) writes ``<stem>.md`` and ``<stem>.png`` next to each file and
``benchmarks/results/README_table.md``: the table the README shows.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional

from .schema import RESULTS_DIR

#: docs/design.md §6 CPU target grid: the kernel >= 2x faster than the unfused chain at T >= 64.
TARGET_D = (576, 2048, 4096)
TARGET_T = (1, 64, 2048)
TARGET_K = (16, 171)
TARGET_SPEEDUP = 2.0
KEY_MODES = ("steer_norm", "monitor_norm")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def by_case(doc: dict) -> Dict[str, Dict[str, dict]]:
    """``{case: {impl: record}}`` over the successful records, in run order."""
    out: Dict[str, Dict[str, dict]] = {}
    for r in doc["results"]:
        if r["status"] == "ok":
            out.setdefault(r["case"], {})[r["impl"]] = r
    return out


def _us(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.1f}" if s < 1e-2 else f"{s * 1e6:.0f}"


def _ratio(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    """a.median / b.median, or None."""
    if a is None or b is None:
        return None
    return a["median_s"] / b["median_s"]


def junction_rows(doc: dict, key_only: bool = False) -> List[dict]:
    """One row per (junction case, kernel impl) with the side-by-side ratios of that run."""
    rows = []
    for case, impls in by_case(doc).items():
        kernels = [r for r in impls.values() if r["role"] == "kernel"]
        if not kernels or kernels[0]["family"] != "junction":
            continue
        p = kernels[0]["params"]
        if key_only and not (p["mode"] in KEY_MODES and p["d"] in TARGET_D
                             and p["T"] in TARGET_T and p["K"] in TARGET_K):
            continue
        floors = [r for r in impls.values() if r["role"] == "floor"]
        floor = min(floors, key=lambda r: r["median_s"]) if floors else None
        eager, comp = impls.get("chain_eager"), impls.get("chain_compiled")
        for k in kernels:
            rows.append(dict(params=p, kernel=k, eager=eager, compiled=comp, floor=floor,
                             vs_eager=_ratio(eager, k), vs_compiled=_ratio(comp, k),
                             vs_floor=_ratio(k, floor)))
    rows.sort(key=lambda r: (r["params"]["dtype"], r["params"]["mode"], r["params"]["d"],
                             r["params"]["K"], r["params"]["T"], r["kernel"]["impl"]))
    return rows


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def junction_table(rows: List[dict]) -> str:
    head = ("| T | d | K | mode | dtype | kernel | kernel us [p10, p90] | GB/s | % copy BW "
            "| eager chain us (kernel speedup) | compiled chain us (kernel speedup) "
            "| add+RMSNorm floor us (kernel / floor) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        p, k = r["params"], r["kernel"]
        frac = f"{100 * k['frac_copy_bw']:.1f}" if k.get("frac_copy_bw") is not None else "-"
        eager = ("-" if r["eager"] is None
                 else f"{_us(r['eager']['median_s'])} ({_x(r['vs_eager'])})")
        comp = ("-" if r["compiled"] is None
                else f"{_us(r['compiled']['median_s'])} ({_x(r['vs_compiled'])})")
        floor = ("-" if r["floor"] is None
                 else f"{_us(r['floor']['median_s'])} {r['floor']['impl'].split('_')[-1]} "
                      f"({_x(r['vs_floor'])})")
        lines.append(
            f"| {p['T']} | {p['d']} | {p['K']} | {p['mode']} | {p['dtype']} | "
            f"{k['impl'].replace('fused_', '')} | {_us(k['median_s'])} [{_us(k['p10_s'])}, "
            f"{_us(k['p90_s'])}] | {k['gbps']:.1f} | {frac} | {eager} | {comp} | {floor} |")
    return "\n".join(lines)


def target_summary(doc: dict) -> str:
    """docs/design.md §6 (CPU): the kernel beats the unfused chain, >= 2x at T >= 64 on the target grid."""
    rows = [r for r in junction_rows(doc, key_only=True)
            if r["params"]["T"] >= 64 and r["vs_eager"] is not None]
    if not rows:
        return ""
    ok = [r for r in rows if r["vs_eager"] >= TARGET_SPEEDUP]
    worst = min(rows, key=lambda r: r["vs_eager"])
    wp = worst["params"]
    line = (f"Kernel vs unfused eager chain at T >= 64 (d in {list(TARGET_D)}, K in "
            f"{list(TARGET_K)}, {'/'.join(KEY_MODES)}): >= {TARGET_SPEEDUP:g}x in "
            f"{len(ok)}/{len(rows)} cases; slowest ratio {worst['vs_eager']:.2f}x at "
            f"T={wp['T']} d={wp['d']} K={wp['K']} {wp['mode']}.")
    comp = [r for r in rows if r["vs_compiled"] is not None]
    if comp:
        beat = sum(r["vs_compiled"] > 1 for r in comp)
        line += f" Faster than the torch.compile'd chain in {beat}/{len(comp)}."
    return line


def other_table(doc: dict) -> str:
    """Non-junction families (end-to-end decode) and every skipped or failed record."""
    lines = []
    recs = [r for r in doc["results"] if r["family"] != "junction" and r["status"] == "ok"]
    if recs:
        lines += ["| case | impl | median ms per step [p10, p90] | tokens/s | time / stock "
                  "(paired median) |", "|---|---|---|---|---|"]
        for r in recs:
            tps = "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.1f}"
            rat = "-" if r.get("ratio_to_stock") is None else f"{r['ratio_to_stock']:.3f}x"
            lines.append(f"| {r['case']} | {r['impl']} | {r['median_s'] * 1e3:.3f} "
                         f"[{r['p10_s'] * 1e3:.3f}, {r['p90_s'] * 1e3:.3f}] | {tps} | {rat} |")
        lines.append("")
    bad = [r for r in doc["results"] if r["status"] != "ok"]
    if bad:
        lines.append("Not measured:")
        for r in bad:
            lines.append(f"- `{r['case']}` {r['impl']}: {r['status']} ({r.get('reason', '')})")
    return "\n".join(lines)


def header(doc: dict) -> str:
    m, v, g = doc["machine"], doc["versions"], doc["git"]
    where = m["gpu"] if doc["device"] == "cuda" else f"{m['cpu_model']}, {m['cores']} cores"
    rev = (g["revision"] or "unknown")[:10] + (" (dirty)" if g.get("dirty") else "")
    bw = doc["copy_bandwidth"]["gbps"]
    lines = [f"**{doc['label']}** — {doc['device'].upper()}: {where}; torch {v['torch']}, "
             f"{doc['created'][:10]}, git {rev}, {doc['size']} set, {doc['elapsed_s']:.0f} s. "
             f"Measured copy bandwidth (`dst.copy_(src)`, read + write): {bw:.1f} GB/s."]
    if doc["device"] == "cpu" and m.get("cpu_kernel_simd"):
        lines[0] += f" CPU kernel: {m['cpu_kernel_simd']}, {m['torch_threads']} threads."
    for n in doc.get("notes", []):
        lines.append(f"> Note: {n}")
    if not doc.get("complete"):
        lines.append("> Note: this run did not complete; the table shows what it measured.")
    return "\n\n".join(lines)


def markdown(doc: dict, key_only: bool = False) -> str:
    parts = [header(doc)]
    summary = target_summary(doc)
    if summary:
        parts.append(summary)
    rows = junction_rows(doc, key_only)
    if rows:
        parts.append(junction_table(rows))
        parts.append(
            "Times are medians per call; inputs rotate over enough copies to exceed twice the "
            "last-level cache (column `sets` in the JSON), so caches do not flatter small "
            "cases. Speedup = baseline time / kernel time, measured side by side in this run; "
            "kernel / floor = kernel time / fastest plain add+RMSNorm (no monitoring, no "
            "steering) at the same shape. GB/s counts the bytes the junction must move once "
            "(steerkernel/bench/roofline.py); % copy BW divides it by the `dst.copy_(src)` "
            "bandwidth measured in the same run.")
    other = other_table(doc)
    if other:
        parts.append(other)
    return "\n\n".join(parts) + "\n"


def plot(doc: dict, path: str) -> Optional[str]:
    """Speedup over the chains and fraction of copy bandwidth vs T; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in junction_rows(doc) if r["params"]["mode"] == "steer_norm"]
    if not rows:
        return None
    dtypes = [r["params"]["dtype"] for r in rows]
    main = max(set(dtypes), key=dtypes.count)
    series = defaultdict(list)
    for r in rows:
        p = r["params"]
        if p["dtype"] == main:
            series[(r["kernel"]["impl"], p["d"], p["K"])].append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, ((impl, d, K), rs) in enumerate(sorted(series.items())):
        rs.sort(key=lambda r: r["params"]["T"])
        Ts = [r["params"]["T"] for r in rs]
        c = f"C{i % 10}"
        lab = f"{impl.replace('fused_', '')} d={d} K={K}"
        a.plot(Ts, [r["vs_eager"] or float("nan") for r in rs], "o-", color=c, label=lab)
        if any(r["vs_compiled"] for r in rs):
            a.plot(Ts, [r["vs_compiled"] or float("nan") for r in rs], "s--", color=c)
        b.plot(Ts, [100 * (r["kernel"].get("frac_copy_bw") or float("nan")) for r in rs], "o-",
               color=c, label=lab)
        if any(r["floor"] for r in rs):
            b.plot(Ts, [100 * ((r["floor"] or {}).get("frac_copy_bw") or float("nan"))
                        for r in rs], "x:", color=c)
    a.axhline(1, color="grey", lw=0.8)
    a.axhline(TARGET_SPEEDUP, color="grey", lw=0.8, ls=":")
    a.set(xscale="log", yscale="log" if a.has_data() else "linear", xlabel="tokens T",
          ylabel="speedup (baseline time / kernel time)",
          title="kernel vs unfused chain: eager (solid), torch.compile (dashed)")
    b.set(xscale="log", xlabel="tokens T", ylabel="% of measured copy bandwidth",
          title="achieved bandwidth: kernel (solid), add+RMSNorm floor (dotted)")
    from matplotlib.ticker import FuncFormatter

    for axis in (a.yaxis.set_major_formatter, a.yaxis.set_minor_formatter):
        axis(FuncFormatter(lambda v, _: f"{v:g}x"))
    a.legend(fontsize=7)
    m = doc["machine"]
    where = m["gpu"] if doc["device"] == "cuda" else f"{m['cpu_model']} ({m['cores']} cores)"
    fig.suptitle(f"steerkernel junction, steer+norm, {main}: {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latest_results(directory: str = RESULTS_DIR) -> List[str]:
    """The newest complete quick/full result file per device in ``directory``."""
    best: Dict[str, tuple] = {}
    for path in glob.glob(os.path.join(directory, "*.json")):
        if os.path.basename(path) == "schema.json":
            continue
        try:
            doc = load(path)
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("size") not in ("quick", "full"):
            continue
        if not doc.get("complete"):
            continue
        key = (doc["size"] == "full", doc["created"])  # a full run wins over a quick one
        if doc["device"] not in best or key > best[doc["device"]][0]:
            best[doc["device"]] = (key, path)
    return [best[d][1] for d in sorted(best)]


def render_files(paths: List[str], out_dir: Optional[str] = None,
                 readme: Optional[str] = os.path.join(RESULTS_DIR, "README_table.md"),
                 project_readme: Optional[str] = None) -> str:
    """Write ``<stem>.md`` + ``<stem>.png`` per file (in ``out_dir`` or beside it) and, unless
    ``readme`` is None, the README table, also spliced into ``project_readme`` between its
    benchmark-table markers when given.  Returns the Markdown of the key tables."""
    key_parts = []
    for path in paths:
        doc = load(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        d = out_dir or os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        png = plot(doc, os.path.join(d, stem + ".png"))
        text = markdown(doc)
        if png:
            text += f"\n![{stem}]({os.path.basename(png)})\n"
        with open(os.path.join(d, stem + ".md"), "w") as f:
            f.write(text)
        key_parts.append(markdown(doc, key_only=True)
                         + f"\nFull table: `benchmarks/results/{stem}.md`.\n")
    text = "\n".join(key_parts)
    if readme:
        with open(readme, "w") as f:
            f.write("<!-- generated by `python -m benchmarks report` from the committed result "
                    "files; do not edit by hand -->\n\n" + text)
        if project_readme:
            splice_readme(text, project_readme)
    return text


README_START = "<!-- benchmark-table:start -->"
README_END = "<!-- benchmark-table:end -->"


PROJECT_README = os.path.normpath(os.path.join(RESULTS_DIR, "..", "..", "README.md"))


def splice_readme(text: str, path: str = PROJECT_README) -> bool:
    """Replace what lies between the benchmark-table markers of the project README with
    ``text``.  Returns False (and writes nothing) when the README or a marker is missing."""
    try:
        with open(path) as f:
            doc = f.read()
    except OSError:
        return False
    i, j = doc.find(README_START), doc.find(README_END)
    if i < 0 or j < i:
        return False
    doc = doc[:i + len(README_START)] + "\n" + text.rstrip() + "\n" + doc[j:]
    with open(path, "w") as f:
        f.write(doc)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__)
    p.add_argument("files", nargs="*", help="result JSON files (default: newest per device)")
    p.add_argument("--out", default=None, help="directory for .md/.png (default: beside each)")
    p.add_argument("--readme", default=os.path.join(RESULTS_DIR, "README_table.md"),
                   help="where to write the README table ('none' to skip)")
    args = p.parse_args(argv)
    files = args.files or latest_results()
    if not files:
        print("no complete quick/full result files found in " + RESULTS_DIR)
        return 1
    readme = None if args.readme == "none" else args.readme
    print(render_files(files, args.out, readme, project_readme=readme and PROJECT_README))
    print("rendered: " + ", ".join(files) + (f"; README table -> {readme}" if readme else ""))
    return 0
