"""``steerkernel space``: geometry of a concept bank's space at every layer, against the
concepts' valence / arousal ratings.

For each layer of the bank (``--bank FILE``, or the built-in emotion bank of ``--model``,
extracted on first use): the share of variance on PC1 of the centred unit directions, Pearson
r of PC1 with valence and of PC2 with arousal (PCs oriented so these are >= 0), and the
held-out r of the best linear valence axis (leave-one-out ridge readout), each with a 95 %
bootstrap interval over concepts; then whether any layer reaches |r(PC1, valence)| >= 0.6 and
which layers are best.  The statistics are
:func:`steerkernel.concepts.analysis.space_by_layer` (its docstring has the math).
``--json`` prints the whole result as one JSON object, ``--out`` writes it to a file, and
``--plot`` draws it (:func:`~steerkernel.concepts.analysis.plot_space_by_layer`).
"""
from __future__ import annotations

import argparse
import json
import sys

from ._common import BANK_HELP, MODEL_HELP, nonneg_int, positive_int, printable

#: most bootstrap resamples / permutations accepted (memory grows as resamples x concepts)
MAX_RESAMPLES = 100_000


def add_arguments(p) -> None:
    # the one-line description is longer than a terminal: shown as is, not wrapped
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n  steerkernel space --bank my_bank.safetensors --plot space.png\n"
                "  steerkernel space --model ./my-hf-checkpoint --json --out space.json")
    g = p.add_argument_group("model and bank")
    g.add_argument("--bank", default=None, help=BANK_HELP)
    g.add_argument("--model", default=None,
                   help=MODEL_HELP + "; only loaded when there is no --bank (its default bank "
                                     "is analysed) or to check that --bank fits it")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar while building the default bank")
    g = p.add_argument_group("statistics and output")
    g.add_argument("--boot", type=positive_int, default=None, metavar="N",
                   help="bootstrap resamples per interval (default 2000)")
    g.add_argument("--perm", type=nonneg_int, default=None, metavar="N",
                   help="rating shuffles for the permutation p-values (default 200, 0 = none)")
    g.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the resampling (default %(default)s)")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g.add_argument("--out", default=None, metavar="FILE.json",
                   help="also write the result to this JSON file")
    g.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw |r| per layer with its intervals to this PNG")


def _check(args) -> None:
    """Everything that needs neither the bank nor the model (one-line errors, exit 2)."""
    from ..fileio import check_output_file
    from ._common import check_args

    for opt, n in (("--boot", args.boot), ("--perm", args.perm)):
        if n is not None and n > MAX_RESAMPLES:
            raise ValueError(f"{opt} must be at most {MAX_RESAMPLES}, got {n}")
    check_args(args)  # --bank a regular file, --model a local checkpoint
    for opt, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            check_output_file(path, opt)


def _load_bank(args):
    from ..concepts import ConceptBank

    if args.bank is not None and args.model is None:
        return ConceptBank.load(args.bank)  # no model needed
    from ._common import load_model_and_bank

    return load_model_and_bank(args)[2]


def _r(c: dict) -> str:
    """``+0.62 [+0.40, +0.79]`` (``n/a`` for an undefined statistic)."""
    if c.get("value") is None:
        return f"{'n/a':<21}"
    lo = "  n/a" if c.get("lo") is None else f"{c['lo']:+.2f}"
    hi = "n/a" if c.get("hi") is None else f"{c['hi']:+.2f}"
    return f"{c['value']:+.2f} [{lo}, {hi}]".ljust(21)


def _p(p) -> str:
    return "   -  " if p is None else f"{p:6.3f}"


def table(res: dict) -> str:
    """The human-readable per-layer table and closing lines of a ``space_by_layer`` result."""
    from ..concepts.analysis import R_TARGET

    lines = [f"{res['n_concepts']} rated concepts, {res['n_boot']} bootstrap resamples "
             f"({round(100 * res['level'])} % intervals over concepts), {res['n_perm']} "
             "rating shuffles (p)"]
    if res["excluded"]:
        shown = ", ".join(printable(n, 40) for n in res["excluded"][:12])
        lines.append(f"left out (no valence / arousal rating): {shown}"
                     + (" ..." if len(res["excluded"]) > 12 else ""))
    lines.append(f"{'layer':>6} {'PC1 var%':>8}  {'r(PC1,val) [95% CI]':<21} {'p':>6}  "
                 f"{'r(PC2,aro) [95% CI]':<21}  {'CV val-axis r [95% CI]':<22} {'p':>6}")
    for row in res["layers"]:
        mark = "*" if row["layer"] == res.get("default_layer") else " "
        var = "n/a" if row["explained_pc1"] is None else f"{100 * row['explained_pc1']:.1f}"
        ax = row["valence_axis"]
        lines.append(f"{row['layer']:>5}{mark} {var:>8}  {_r(row['r_pc1_valence'])} "
                     f"{_p(row['r_pc1_valence'].get('p_perm'))}  {_r(row['r_pc2_arousal'])}  "
                     f"{_r(ax['r']):<22} {_p(ax.get('p_perm'))}")
    lines.append("(* default layer; PC1 / PC2 oriented so that r(PC1,val), r(PC2,aro) >= 0; CV "
                 "val-axis r: held-out r\n of a leave-one-out ridge readout of valence; p: "
                 "permutation p-value, rating shuffles)")
    by = {row["layer"]: row for row in res["layers"]}
    b1, b2 = res["best_layer_pc1_valence"], res["best_layer_valence_axis"]
    best1 = "none" if b1 is None else \
        f"layer {b1}, r = {_r(by[b1]['r_pc1_valence']).strip()}"
    best2 = "none" if b2 is None else \
        f"layer {b2}, r = {_r(by[b2]['valence_axis']['r']).strip()}"
    reach = [str(r["layer"]) for r in res["layers"] if r["r_pc1_valence"]["value"] is not None
             and abs(r["r_pc1_valence"]["value"]) >= R_TARGET]
    verdict = (f"layer{'s' if len(reach) > 1 else ''} {', '.join(reach)} reach" if reach
               else "no layer reaches")
    lines.append(f"{verdict} |r(PC1, valence)| >= {R_TARGET}; best PC1: {best1}; "
                 f"best held-out valence axis: {best2}")
    return "\n".join(lines)


def run(args) -> int:
    from ..concepts.analysis import plot_space_by_layer, space_by_layer
    from ..fileio import atomic_write_bytes

    _check(args)
    bank = _load_bank(args)
    kw = {} if args.perm is None else {"n_perm": args.perm}
    res = space_by_layer(bank, n_boot=args.boot, seed=args.seed, **kw)
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(res, indent=1) + "\n").encode())
    if args.plot:
        plot_space_by_layer(res, args.plot)
    if args.json:
        print(json.dumps(res))
    else:
        print(table(res))
        for opt, path in (("result", args.out), ("plot", args.plot)):
            if path:
                print(f"wrote {opt} to {printable(path)}", file=sys.stderr)
    return 0
