"""``steerkernel calibrate``: per concept, the strength reaching a target (or the largest)
judge effect at a bounded coherence cost, written into the bank's metadata
(see :mod:`steerkernel.eval.calibrate`)."""
from __future__ import annotations

import sys

from ._common import finite_float, printable
from .eval import (add_common, add_sampling, check_files, ci, emit, load, name_list,
                   print_table, sampling_kw, write_json)


def add_arguments(p) -> None:
    from ..eval.calibrate import BOUNDS

    p.epilog = ("example: steerkernel calibrate --concepts calm,desperate "
                "--save-bank calibrated.safetensors")
    p.add_argument("--concepts", type=name_list, required=True,
                   help="concepts to calibrate, comma-separated")
    p.add_argument("--target-effect", type=finite_float, default=None,
                   help="judge effect to reach (default: the largest admissible effect)")
    p.add_argument("--max-ppl-ratio", type=finite_float, default=BOUNDS["max_ppl_ratio"])
    p.add_argument("--max-topic-drop", type=finite_float, default=BOUNDS["max_topic_drop"])
    p.add_argument("--max-repetition-rise", type=finite_float,
                   default=BOUNDS["max_repetition_rise"])
    p.add_argument("--save-bank", default=None, metavar="FILE",
                   help="save the bank with the recommendations in its metadata")
    p.add_argument("--record", default=None, metavar="FILE.json",
                   help="write the recommendations with the model fingerprint and corpus hash "
                        "(the format of steerkernel/data/calibrated_strengths.json)")
    add_common(p, strengths="0.005,0.01,0.015,0.02,0.03",
               strengths_help="positive strengths to try (rel units)")
    add_sampling(p)


def run(args) -> int:
    from ..eval.calibrate import apply, calibrate, record
    from ..eval.harness import plot_dose_response

    check_files(args, "bank", "prompts")
    if any(s <= 0 for s in args.strengths):
        raise ValueError("--strengths: calibration strengths must be positive")
    kw = sampling_kw(args)
    model, tok, bank = load(args, args.concepts)
    res = calibrate(model, tok, bank, args.concepts, args.strengths,
                    target_effect=args.target_effect, layers=args.layers,
                    bounds={"max_ppl_ratio": args.max_ppl_ratio,
                            "max_topic_drop": args.max_topic_drop,
                            "max_repetition_rise": args.max_repetition_rise}, **kw)
    if args.save_bank:
        apply(bank, res)
        bank.save(args.save_bank)
    if args.record:
        write_json(args.record, record(model, res))
    if emit(args, res, lambda doc, path: plot_dose_response(
            [r["evaluation"] for r in doc["concepts"].values()], path)):
        return 0
    out = sys.stdout
    for c, r in res["concepts"].items():
        print_table(r["evaluation"], out)
        rec = r["recommended"]
        if rec is None:
            out.write(f"=> {printable(c)}: no recommendation ({r['reason']})\n\n")
        else:
            out.write(f"=> {printable(c)}: recommended strength {rec['strength']:g} @ "
                      f"{rec['layers']}: judge effect {ci(rec['effect'])}, perplexity x"
                      f"{rec['ppl_ratio']['value']:.2f}; {r['reason']}\n\n")
    return 0
