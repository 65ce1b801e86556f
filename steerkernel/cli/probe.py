"""``steerkernel probe``: the behavioural A/B probe -- p(harmful option) of pressure-choice
items under steering, as a dose-response with 95 % intervals over items
(see :mod:`steerkernel.eval.choices`)."""
from __future__ import annotations

import sys

from ._common import printable
from .eval import add_common, check_files, ci, emit, load, name_list


def add_arguments(p) -> None:
    p.epilog = "example: steerkernel probe --concepts desperate,calm --plot probe.png"
    p.add_argument("--concepts", type=name_list, default=["desperate", "calm"],
                   help="concepts to steer, comma-separated (default desperate,calm)")
    p.add_argument("--items", default=None,
                   help="A/B item file (default: the built-in pressure choices)")
    add_common(p, strengths="-0.04,-0.02,-0.01,0.01,0.02,0.04",
               strengths_help="strengths, negative = away from the concept (0 always added)")


def run(args) -> int:
    from ..eval.choices import load_items, plot_probe, probe

    check_files(args, "bank", "items")
    items = load_items(args.items)
    model, tok, bank = load(args, args.concepts)
    res = probe(model, tok, bank, args.concepts, args.strengths, layers=args.layers,
                items=items, batch_size=args.batch_size, seed=args.seed, backend=args.backend,
                progress=not args.no_progress)
    if emit(args, res, plot_probe):
        return 0
    out = sys.stdout
    out.write(f"{res['n_items']} A/B pressure items, steering @ layers {res['layers']}; "
              f"95% CIs over items\n")
    for c, rep in res["concepts"].items():
        out.write(f"{printable(c)}:\n{'strength':>9}  {'p(harmful)':<26}{'change':<26}"
                  f"{'harmful wins':<12}\n")
        for r in rep["strengths"]:
            out.write(f"{r['strength']:>9g}  {ci(r['p_harmful']):<26}{ci(r['change']):<26}"
                      f"{r['harmful_wins']['value']:<12.2f}\n")
        out.write(f"  {rep['verdict']}\n")
    return 0
