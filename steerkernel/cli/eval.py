"""``steerkernel eval``: dose-response of steering one or more concepts -- the effect an
independent judge measures, the coherence cost, and the monitor's own reading, each with a 95 %
bootstrap interval over prompts (see :mod:`steerkernel.eval.harness`)."""
from __future__ import annotations

import json
import math
import sys
from typing import List, Optional

from ._common import finite_float, nonneg_int, positive_int, printable, seed_int


def float_list(text: str) -> List[float]:
    import argparse

    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected finite comma-separated numbers, got {text!r}")
    return vals


def name_list(text: str) -> List[str]:
    import argparse

    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated concept names")
    return names


def add_common(p, *, strengths: str, strengths_help: str) -> None:
    """Options shared by ``eval``, ``calibrate`` and ``probe``."""
    g = p.add_argument_group("model and bank")
    g.add_argument("--model", default=None, help="local HF checkpoint directory or .gguf file "
                                                 "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--bank", default=None, help="concept bank file (default: the model's "
                                                "built-in emotion bank)")
    g.add_argument("--backend", default=None, choices=["reference", "cpu", "triton", "cuda"])
    g.add_argument("--layers", default=None,
                   help="steering layers, e.g. 8-21 (default: the middle of the stack)")
    g.add_argument("--strengths", type=float_list, default=float_list(strengths),
                   help=strengths_help + f" (default {strengths})")
    g.add_argument("--batch-size", type=positive_int, default=32, help="rows per forward")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="sampling and bootstrap seed, in [0, 2^32)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="FILE.json", help="write the full result")
    o.add_argument("--plot", default=None, metavar="FILE.png", help="draw the dose-response")
    o.add_argument("--json", action="store_true", help="print the result as JSON")


def add_sampling(p) -> None:
    from ..eval.harness import DEFAULTS

    g = p.add_argument_group("generation")
    g.add_argument("--prompts", default=None,
                   help="prompt file: {'prompts': [{'id','text'}]}, a JSON list or one prompt "
                        "per line (default: the built-in everyday set)")
    g.add_argument("--n-prompts", type=positive_int, default=DEFAULTS["n_prompts"],
                   help="use the first N prompts (default %(default)s)")
    g.add_argument("--samples", type=positive_int, default=DEFAULTS["samples"],
                   help="sampled replies per prompt and strength (default %(default)s)")
    g.add_argument("--max-new-tokens", type=positive_int, default=DEFAULTS["max_new_tokens"])
    g.add_argument("--temperature", type=finite_float, default=DEFAULTS["temperature"])
    g.add_argument("--top-k", type=nonneg_int, default=DEFAULTS["top_k"])
    g.add_argument("--judge", default="vader", choices=["vader"],
                   help="independent judge (VADER valence, MIT licence)")


def check_files(args, *names: str) -> None:
    """Input files exist and output paths are writable, before the model loads."""
    from ..errors import InputError
    from ..fileio import check_output_file, check_regular_file

    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            check_regular_file(v, "--" + n.replace("_", "-"), InputError)
    for n in ("out", "plot", "save_bank", "record"):
        v = getattr(args, n, None)
        if v is not None:
            check_output_file(v, "--" + n.replace("_", "-"))
    save_bank = getattr(args, "save_bank", None)
    if save_bank is not None and str(save_bank).endswith((".pt", ".pth", ".gguf")):
        raise InputError(f"--save-bank: banks are saved as .safetensors, not {save_bank!r}")


def load(args, concepts=()):
    """``(model, tokenizer, bank)`` as ``--model`` / ``--bank`` say; every name of
    ``concepts`` must be in the bank (UnknownConceptError lists the bank's names)."""
    from ..concepts import ConceptBank
    from ..concepts.default import default_bank
    from ..live import load_model_quietly

    model, tok = load_model_quietly(args.model)
    if args.bank is not None:
        bank = ConceptBank.load(args.bank)
        bank.check_fits(model)
    else:
        bank = default_bank(model, tok, progress=not args.no_progress)
    for c in concepts:
        bank.concept_index(c)
    return model, tok, bank


def sampling_kw(args) -> dict:
    from ..eval.harness import load_prompts

    prompts = load_prompts(args.prompts)[:args.n_prompts]
    if len(prompts) < 2:
        raise ValueError("--n-prompts: an evaluation needs at least 2 prompts")
    return {"prompts": prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
            "batch_size": args.batch_size, "judge": args.judge, "backend": args.backend,
            "progress": not args.no_progress}


def write_json(path: str, obj) -> None:
    from ..fileio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def emit(args, doc: dict, draw) -> bool:
    """Write ``--out`` (JSON), draw ``--plot`` with ``draw(doc, path)``, print the JSON for
    ``--json``; True when the JSON was printed (the caller prints no table then)."""
    if args.out:
        write_json(args.out, doc)
    if args.plot:
        draw(doc, args.plot)
    if args.json:
        print(json.dumps(doc))
    return bool(args.json)


def ci(v: Optional[dict], fmt: str = "{:+.3f}") -> str:
    if not v or v.get("value") is None or not math.isfinite(v["value"]):
        return "n/a"
    return f"{fmt.format(v['value'])} [{fmt.format(v['lo'])}, {fmt.format(v['hi'])}]"


def print_table(res: dict, out=None) -> None:
    out = sys.stdout if out is None else out  # looked up at call time (redirected streams)
    s = res["settings"]
    out.write(f"{printable(res['concept'])} @ layers {res['layers']}: judge {res['judge']['name']}"
              f" ({res['judge']['axis']}, expected {'+' if res['expected_sign'] > 0 else '-'}); "
              f"{s['n_prompts']} prompts x {s['samples']} samples, {s['max_new_tokens']} tokens, "
              f"T={s['temperature']:g}; 95% CIs over prompts\n")
    out.write(f"{'strength':>9}  {'judge effect':<26}{'monitor dz':<24}{'ppl ratio':<22}"
              f"{'repetition':<12}{'on-topic':<10}{'topic PMI':<10}\n")
    for r in res["strengths"]:
        out.write(f"{r['strength']:>9g}  {ci(r['effect']):<26}"
                  f"{ci(r['monitor_change'], '{:+.2f}'):<24}{ci(r['ppl_ratio'], '{:.2f}'):<22}"
                  f"{r['repetition']['value']:<12.3f}{r['on_topic']['value']:<10.2f}"
                  f"{r['topic_pmi']['value']:<10.2f}\n")


def add_arguments(p) -> None:
    p.epilog = "example: steerkernel eval --concept desperate --strengths 0.01,0.02 --plot eval.png"
    p.add_argument("--concept", type=name_list, required=True, action="extend",
                   help="concept(s) to steer toward, comma-separated or repeated")
    p.add_argument("--direction", type=int, choices=[1, -1], default=None,
                   help="which way the valence judge should move (default: the sign of the "
                        "concept's valence rating)")
    add_common(p, strengths="0.005,0.01,0.02",
               strengths_help="steering strengths (rel units; 0, the control, is always added)")
    add_sampling(p)


def run(args) -> int:
    from ..eval.harness import evaluate, plot_dose_response

    check_files(args, "bank", "prompts")
    kw = sampling_kw(args)
    model, tok, bank = load(args, args.concept)
    results = [evaluate(model, tok, bank, c, args.strengths, layers=args.layers,
                        direction=args.direction, **kw) for c in args.concept]
    if not emit(args, {"evaluations": results},
                lambda doc, path: plot_dose_response(doc["evaluations"], path)):
        for r in results:
            print_table(r)
    return 0
