"""``steerkernel demo``: the first-run demo (see :mod:`steerkernel.demo`).

With no arguments: the embedded SmolLM2-135M-Instruct, its cached emotion bank (built on first
use), every built-in scenario unsteered and steered (more calm, less desperate), per-token
traces, PNG plots and a side-by-side of what steering changed, in ./steerkernel-demo.
``--op-only`` runs the junction op alone on random data (no model).
"""
from __future__ import annotations

from ._common import finite_float, positive_int


def add_arguments(p) -> None:
    p.add_argument("--out", default="steerkernel-demo",
                   help="output directory for the plots and summary.json (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="one scenario (deadline_agent), 12 new tokens: a fast first look")
    p.add_argument("--scenario", action="append", default=None, metavar="NAME",
                   help="run only this built-in scenario (repeatable)")
    p.add_argument("--steer", action="append", default=[], metavar="PROGRAM",
                   help="steering program of the steered run (repeatable; default "
                        "'calm=+0.02@8-21; desperate=-0.02@8-21' on a 30-layer model)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="tokens per generation (default 48, 12 with --quick)")
    p.add_argument("--repetition-penalty", type=finite_float, default=1.3,
                   help="repetition penalty of the greedy decoding (default %(default)s)")
    p.add_argument("--model", default=None,
                   help="local HF checkpoint directory or .gguf file (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--bank", default=None,
                   help="concept bank file (default: the cached built-in emotion bank)")
    p.add_argument("--layer", type=int, default=None,
                   help="layer shown in traces and tables (default: the bank's default layer)")
    p.add_argument("--backend", default=None, choices=["reference", "cpu", "triton", "cuda"],
                   help="junction backend (default: automatic)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.add_argument("--op-only", action="store_true",
                   help="only the junction op on random data (no model, a few ms)")


def run(args) -> int:
    import os

    if args.op_only:
        from ..demo import op_demo

        return op_demo(args.backend)
    from ._common import check_args

    check_args(args)  # steering grammar, --bank / --model paths: before any loading
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out!r} exists and is not a directory")
    if args.scenario:
        from ..demo import load_scenarios

        known = [s["name"] for s in load_scenarios()]
        bad = [s for s in args.scenario if s not in known]
        if bad:
            raise ValueError(f"--scenario: unknown {', '.join(map(repr, bad))} (built-in: "
                             f"{', '.join(known)})")
    from ..demo import run_demo

    program = "; ".join(s.strip() for s in args.steer) if args.steer else None
    run_demo(args.out, model_name=args.model, bank_path=args.bank,
             quick=args.quick, scenarios=args.scenario, program=program,
             max_new_tokens=args.max_new_tokens, layer=args.layer,
             repetition_penalty=args.repetition_penalty, plots=not args.no_plots,
             progress=not args.no_progress, backend=args.backend)
    return 0
