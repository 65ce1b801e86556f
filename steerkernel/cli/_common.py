"""Options and helpers shared by ``steerkernel monitor``, ``generate`` and ``demo``.

Everything a user can get wrong is checked by :func:`check_args` before the model loads, so a
bad argument costs no time and gives one line on stderr (``steerkernel <cmd>: error: ...``,
exit 2, printed by :func:`steerkernel.cli.main.main`).  Input files are read through
:func:`steerkernel.fileio.read_text_input` (regular files or stdin, size-capped) and the JSONL
log is checked by :func:`steerkernel.fileio.check_output_file` (no FIFO).  Every string from a
bank or an error that reaches the terminal goes through :func:`printable`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import List, Optional

#: sampling temperatures other than 0 (greedy) must lie in this range: 1e-300 overflows the
#: logits to inf (NaN probabilities); beyond 1e6 sampling is uniform anyway
TEMPERATURE_RANGE = (1e-6, 1e6)
#: the repetition penalty must lie in this range (1e-300 divides by a float32 zero)
REPETITION_PENALTY_RANGE = (1e-6, 1e6)

MODEL_HELP = ("local HF checkpoint directory or .gguf file (default: the embedded "
              "SmolLM2-135M-Instruct)")
BANK_HELP = ("concept bank file (.safetensors / .gguf); default: the built-in emotion bank of "
             "the model, extracted on first use and cached next to the model")


def _int_at_least(lo: int, what: str, hi: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "an integer >= 0")
#: seeds: numpy's generators take non-negative seeds; < 2^32 keeps derived seeds in int64
seed_int = _int_at_least(0, "an integer in [0, 2^32)", 2 ** 32 - 1)


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def printable(text, limit: Optional[int] = None) -> str:
    """``str(text)`` safe for a terminal: newlines, control, bidirectional-override and other
    non-printable characters escaped (``\\n``, ``\\x1b``, ``\\u202e``), and cut to ``limit``
    characters (with `` ...``) when given."""
    text = str(text)
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                       for ch in text)
    return text + (" ..." if cut else "")


def printable_text(text: str) -> str:
    """Generated text safe for a terminal: as :func:`printable`, but newlines and tabs kept
    (model output is free text; escape sequences in it must not reach the terminal)."""
    if text.isprintable():
        return text
    return "".join(ch if ch in "\n\t" or ch.isprintable()
                   else ch.encode("unicode_escape").decode("ascii") for ch in text)


def add_model_options(p) -> None:
    g = p.add_argument_group("model and bank")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    g.add_argument("--bank", default=None, help=BANK_HELP)
    g.add_argument("--layer", type=nonneg_int, default=None,
                   help="decoder layer whose scores are shown and alarmed on (default: the "
                        "bank's default layer)")
    g.add_argument("--backend", default=None,
                   choices=["reference", "cpu", "triton", "cuda"],
                   help="junction backend (default: automatic)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar while building the default bank")


def add_prompt_options(p) -> None:
    g = p.add_argument_group("prompt")
    g.add_argument("prompt", nargs="?", default=None,
                   help="the user message ('-' reads stdin); or use --scenario")
    g.add_argument("--scenario", default=None,
                   help="use a built-in scenario's messages instead (e.g. deadline_agent; "
                        "'list' lists them)")
    g.add_argument("--system", default=None, help="system message (chat models)")
    g.add_argument("--raw", action="store_true",
                   help="feed the prompt as plain text, without the chat template")


def add_generation_options(p, max_new_tokens: int = 64) -> None:
    g = p.add_argument_group("generation and steering")
    g.add_argument("--steer", action="append", default=[], metavar="PROGRAM",
                   help="steering entry, repeatable, e.g. 'calm=+0.05', 'desperate<=0z@8-21', "
                        "'afraid=ablate' (grammar: python -c 'import steerkernel.steering as s;"
                        " help(s)')")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                   help="most tokens to generate (default %(default)s)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (= --temperature 0)")
    g.add_argument("--temperature", type=finite_float, default=0.7,
                   help="sampling temperature, 0 = greedy (default %(default)s)")
    g.add_argument("--top-k", type=nonneg_int, default=40,
                   help="sample among the k most likely tokens, 0 = all (default %(default)s)")
    g.add_argument("--repetition-penalty", type=finite_float, default=1.0,
                   help="CTRL-style repetition penalty, 1 = none (default %(default)s)")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="sampling seed, in [0, 2^32) (default %(default)s)")


def add_monitor_options(p, top: int = 3) -> None:
    g = p.add_argument_group("monitoring and output")
    g.add_argument("--top", type=positive_int, default=top,
                   help="concepts shown per token (default %(default)s)")
    g.add_argument("--alarm", action="append", default=[], metavar="RULE",
                   help="alarm rule, repeatable, e.g. 'desperate z > 2 for 8' or "
                        "'calm z < -1.5 for 4 release -0.5'")
    g.add_argument("--jsonl-log", default=None, metavar="PATH",
                   help="append alarms and a per-generation summary to this JSONL file")
    g.add_argument("--json", action="store_true",
                   help="machine-readable output: one JSON object per generated token, then "
                        "one summary object")


# ------------------------------------------------------------------------------ validation
def check_args(args) -> dict:
    """Validate everything that does not need the model; returns parsed pieces:
    ``program`` (str or None), ``rules`` (AlarmRule list)."""
    from ..monitor import AlarmRule
    from ..steering import parse_program

    out = {"program": None, "rules": []}
    if getattr(args, "greedy", False):
        args.temperature = 0.0
    t = getattr(args, "temperature", 0.0)
    lo, hi = TEMPERATURE_RANGE
    if t < 0 or (t != 0 and not lo <= t <= hi):
        raise ValueError(f"--temperature must be 0 (greedy) or in [{lo:g}, {hi:g}], got {t:g}")
    rp = getattr(args, "repetition_penalty", 1.0)
    lo, hi = REPETITION_PENALTY_RANGE
    if not lo <= rp <= hi:
        raise ValueError(f"--repetition-penalty must be in [{lo:g}, {hi:g}] (1 = none), got "
                         f"{rp:g}")
    steers = [s for s in getattr(args, "steer", []) or []]
    for s in steers:
        if not s.strip():
            raise ValueError("--steer: empty steering entry")
        if not parse_program(s).steers:  # SpecError names a bad entry
            raise ValueError(f"--steer {s!r}: no steering entry (only separators)")
    if steers:
        out["program"] = "; ".join(s.strip() for s in steers)
    for r in getattr(args, "alarm", []) or []:
        out["rules"].append(AlarmRule.parse(r))
    if getattr(args, "bank", None) is not None:
        from ..errors import InputError
        from ..fileio import check_regular_file

        check_regular_file(args.bank, "--bank", InputError)  # before the model loads
    model = getattr(args, "model", None)
    if model not in (None, "default", "SmolLM2-135M-Instruct") and not (
            os.path.isdir(model) or (os.path.isfile(model) and model.endswith(".gguf"))):
        raise FileNotFoundError(
            f"--model: {model!r} is not a local checkpoint directory or .gguf file (steerkernel "
            "never downloads; omit --model for the embedded default)")
    log = getattr(args, "jsonl_log", None)
    if log is not None:
        from ..fileio import check_output_file

        check_output_file(log, "--jsonl-log")  # a FIFO would block the open forever
    return out


def read_prompt(args) -> object:
    """The prompt: a user message string, or a scenario's message list."""
    if getattr(args, "scenario", None) is not None:
        from ..demo import load_scenarios

        scen = load_scenarios()
        if args.scenario == "list":  # list them (stdout) and stop, before the model loads
            for s in scen:
                print(s["name"])
            raise SystemExit(0)
        match = [s for s in scen if s["name"] == args.scenario]
        if not match:
            raise ValueError(f"--scenario: unknown scenario {args.scenario!r} (built-in: "
                             f"{', '.join(s['name'] for s in scen)})")
        if args.prompt is not None:
            raise ValueError("give either a prompt or --scenario, not both")
        return match[0]["messages"]
    if args.prompt is None:
        raise ValueError("no prompt: pass the user message as an argument, '-' for stdin, or "
                         "--scenario NAME")
    if args.prompt == "-":
        from ..fileio import read_text_input

        text = read_text_input("-", "prompt")
    else:
        text = args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


# ------------------------------------------------------------------------------ loading
def load_model_and_bank(args):
    """``(model, tokenizer, bank)`` from ``--model`` / ``--bank`` (the default bank of the model
    when ``--bank`` is not given); the bank is checked against the model."""
    from ..concepts import ConceptBank
    from ..concepts.default import default_bank
    from ..live import load_model_quietly

    model, tok = load_model_quietly(args.model)
    if args.bank is not None:
        bank = ConceptBank.load(args.bank)
        bank.check_fits(model)
    else:
        bank = default_bank(model, tok, progress=not getattr(args, "no_progress", False))
    if getattr(args, "layer", None) is not None:
        bank.layer_index(args.layer)  # BankMismatchError lists the bank's layers
    return model, tok, bank


def prompt_ids(tok, prompt, args) -> List[int]:
    from ..live import chat_ids

    return chat_ids(tok, prompt, system=getattr(args, "system", None),
                    chat=False if getattr(args, "raw", False) else None)


def prepare_generation(args, parsed: Optional[dict] = None) -> dict:
    """Everything ``generate`` and ``monitor`` do before generating: checked arguments, the
    prompt, model, tokenizer and bank, the monitored layer and the prompt's token ids."""
    from ..monitor import JSONLSink

    parsed = check_args(args) if parsed is None else parsed
    prompt = read_prompt(args)
    model, tok, bank = load_model_and_bank(args)
    compile_check(parsed["program"], bank)
    li = bank.layer_index(args.layer)
    layer = bank.layers[li]
    from ..live import resolve_rules

    resolve_rules(parsed["rules"], bank, layer)  # unknown concepts / layers: before any output
    return dict(parsed=parsed, prompt=prompt, model=model, tok=tok, bank=bank, li=li,
                layer=layer, ids=prompt_ids(tok, prompt, args), names=bank.names,
                sinks=[LogSink(JSONLSink(args.jsonl_log, layer=layer), args.jsonl_log)]
                if args.jsonl_log else [])


class LogSink:
    """A sink wrapper whose write errors (a full disk: ``/dev/full``, ENOSPC) name the
    ``--jsonl-log`` path instead of surfacing as a bare ``OSError``."""

    def __init__(self, sink, path: str):
        self.sink, self.path = sink, path

    def _call(self, method: str, *args):
        try:
            return getattr(self.sink, method)(*args)
        except OSError as e:
            raise OSError(e.errno, f"--jsonl-log {self.path!r}: cannot write "
                                   f"({e.strerror or e})") from None

    def alarm(self, event) -> None:
        self._call("alarm", event)

    def request(self, report) -> None:
        self._call("request", report)

    def close(self) -> None:
        self._call("close")


def compile_check(program: Optional[str], bank) -> None:
    """Resolve the program against the bank now (unknown concepts, bad layers)."""
    if program is not None:
        from ..steering import compile_program

        compile_program(program, bank)


def num(x: float) -> Optional[float]:
    x = float(x)
    return round(x, 4) if math.isfinite(x) else None


def ranked_concepts(bank, li: int):
    """``(has_stats [K] bool, among)`` at bank layer index ``li``.  Rankings ("top concepts")
    compare like with like: z-scores of the concepts with baseline statistics when the bank
    has any there (``among`` = ``has_stats``), else every concept's raw projection
    (``among`` None; the monitor's z of a concept without statistics is its raw projection)."""
    has = bank.baseline_std[li].isfinite()
    return has, _among(has)


def _among(has_stats):
    return has_stats if has_stats is not None and bool(has_stats.any()) else None


def token_json(rec, names: List[str], li: int, top: int, layer: int,
               has_stats=None) -> str:
    """One token as a JSON line; ``has_stats`` ``[K]`` bool: concepts with baseline statistics
    at the layer (None: all); the others get ``"z": null`` (their z-score is undefined) and
    are ranked in ``top`` only when no concept has statistics (raw projections)."""
    from ..live import top_concepts

    z = rec.z[li]
    ok = [True] * len(names) if has_stats is None else [bool(v) for v in has_stats]
    return json.dumps({"event": "token", "row": rec.row, "index": rec.index,
                       "token_id": rec.token_id, "text": rec.text, "layer": layer,
                       "top": [[n, num(v)]
                               for n, v in top_concepts(z, names, top, _among(has_stats))],
                       "z": {n: num(z[k]) if ok[k] else None for k, n in enumerate(names)},
                       "score": {n: num(rec.scores[li, k]) for k, n in enumerate(names)}},
                      ensure_ascii=False)


def summary_dict(g, names: List[str], li: int, layer: int, top: int, has_stats=None) -> dict:
    """The summary JSON object of one generation; ``has_stats`` as in :func:`token_json`
    (``mean_z`` is null for the concepts without statistics; ``top_mean`` ranks as there)."""
    from ..live import top_concepts

    n_p = len(g.prompt_ids)
    mean_z = g.z[:, li].mean(0) if len(g.token_ids) else None
    ok = [True] * len(names) if has_stats is None else [bool(v) for v in has_stats]
    return {"event": "summary", "row": g.row, "program": g.program, "text": g.text,
            "tokens": len(g.token_ids), "finished": g.finished, "layer": layer,
            "mean_z": None if mean_z is None else {n: num(mean_z[k]) if ok[k] else None
                                                   for k, n in enumerate(names)},
            "top_mean": None if mean_z is None else
            [[n, num(v)] for n, v in top_concepts(mean_z, names, top, _among(has_stats))],
            "alarms": [dict(a.to_dict(), generated_index=a.token - n_p) for a in g.alarms]}
