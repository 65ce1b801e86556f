"""``steerkernel extract``: extract a concept bank from a model and a corpus."""
from __future__ import annotations

import json
import os
from typing import List, Optional

from ..concepts.extract import DEFAULT_START_OFFSET, METHODS
from ._common import nonneg_int, positive_int


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="local HF checkpoint directory or .gguf file (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", default="builtin",
                   help="'builtin' (the emotion corpus) or a .json / .jsonl corpus file")
    p.add_argument("--layers", default="all",
                   help="'all', a list 'a,b,c', a range 'a-b', or a mix '2,5-9'")
    p.add_argument("--method", default="emotion", choices=sorted(METHODS),
                   help="emotion (mean-centred, neutral PCs removed), mean_diff (CAA / persona "
                        "vectors) or pca_diff (RepE)")
    p.add_argument("--concepts", default=None, help="comma-separated subset of the corpus")
    p.add_argument("--out", required=True, help="output bank file (.safetensors)")
    p.add_argument("--start-offset", type=nonneg_int, default=DEFAULT_START_OFFSET,
                   help="skip this many leading tokens of every text (default %(default)s)")
    p.add_argument("--variance-share", type=float, default=0.5,
                   help="share of neutral variance projected out (emotion method)")
    p.add_argument("--holdout-every", type=int, default=5,
                   help="hold out every n-th text of each concept for the probe (0 = none)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, default=512,
                   help="truncate texts to this many tokens")
    p.add_argument("--plots", default=None,
                   help="also write the circumplex and probe-per-layer PNGs into this directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def parse_layers(spec: str, n_layers: Optional[int]) -> Optional[List[int]]:
    """``"all"`` -> None; ``"2,5-7"`` -> ``[2, 5, 6, 7]``; each in ``[0, n_layers)``.  Range
    ends are checked against ``n_layers`` before a range is expanded (``0-1000000000000`` is a
    prompt error, not a trillion-element set).  ``n_layers=None`` checks the syntax only
    (before the model is loaded) and returns None."""
    spec = spec.strip()
    if spec == "all":
        return None
    out = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            a, b = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part),) * 2
            if b < a or a < 0:
                raise ValueError
        except ValueError:  # also int() of more than 4300 digits
            raise ValueError(f"--layers: cannot read {part[:40]!r} (use 'all', 'a,b,c' or 'a-b' "
                             "with non-negative integers)") from None
        if n_layers is None:
            continue
        if b >= n_layers:
            shown = f"[{b}]" if a == b else f"{max(a, n_layers)}-{b}"
            raise ValueError(f"--layers: {shown} are not layers of this model "
                             f"(0..{n_layers - 1})")
        out.update(range(a, b + 1))
    return sorted(out) if n_layers is not None else None


def run(args) -> int:
    from ..concepts.corpus import load_corpus
    from ..concepts.extract import extract_bank
    from ..live import load_model_quietly

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must be a .safetensors file, got {args.out!r}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out: directory {folder!r} does not exist")
    if os.path.exists(args.out) and not os.path.isfile(args.out):
        raise ValueError(f"--out: {args.out!r} exists and is not a regular file")
    if args.plots is not None and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        # checked now, not after the extraction and after the bank is saved
        raise ValueError(f"--plots: {args.plots!r} exists and is not a directory")
    if not 0 <= args.variance_share < 1:
        raise ValueError(f"--variance-share must be in [0, 1), got {args.variance_share:g}")
    parse_layers(args.layers, None)  # the syntax now; the range once the model says it
    corpus = load_corpus(args.corpus)  # fail fast on a bad corpus, before loading the model
    names = [n.strip() for n in args.concepts.split(",") if n.strip()] if args.concepts else None
    (corpus.subset(names) if names is not None else corpus).split(args.holdout_every)
    model, tok = load_model_quietly(args.model)
    layers = parse_layers(args.layers, model.config.get_text_config().num_hidden_layers)
    bank = extract_bank(model, tok, corpus, method=args.method, layers=layers, names=names,
                        start_offset=args.start_offset, batch_size=args.batch_size,
                        max_length=args.max_length, variance_share=args.variance_share,
                        holdout_every=args.holdout_every, progress=not args.no_progress)
    bank.save(args.out)
    probe = bank.metadata["probe"]
    held = (probe.get("heldout_accuracy") or {}).get(str(bank.default_layer))
    summary = {"out": args.out, "K": bank.K, "layers": bank.layers, "d": bank.d,
               "method": bank.metadata["method"], "default_layer": bank.default_layer,
               "heldout_probe_accuracy": held, "n_heldout": probe.get("n_heldout")}
    if args.plots:
        from ..concepts.analysis import plot_circumplex, plot_probe_curve

        os.makedirs(args.plots, exist_ok=True)
        files = []
        if bank.K >= 3:
            files.append(os.path.join(args.plots, "concept_circumplex.png"))
            plot_circumplex(bank, files[-1])
        if probe.get("heldout_accuracy"):
            files.append(os.path.join(args.plots, "probe_per_layer.png"))
            plot_probe_curve(probe["heldout_accuracy"], files[-1], 1.0 / bank.K,
                             bank.default_layer)
        summary["plots"] = files
    if args.json:
        print(json.dumps(summary))
    else:
        acc = "n/a" if held is None else f"{held:.3f} (chance {1 / bank.K:.3f})"
        print(f"wrote {args.out}: {bank.K} concepts x {len(bank.layers)} layers (d={bank.d}), "
              f"method {summary['method']}, default layer {bank.default_layer}, held-out probe "
              f"accuracy there {acc}")
    return 0
