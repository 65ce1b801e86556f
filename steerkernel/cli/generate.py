"""``steerkernel generate``: generate text, optionally steered (``--steer calm=+0.05``).

The text streams to stdout as it is generated; a one-line monitor summary (mean z of the top
concepts over the generated tokens, alarms) goes to stderr (``--quiet``: none).
``--compare`` also generates without steering in the same batch and prints both texts with the
change in mean z, both re-read on the unsteered model.  ``--json``: one JSON object per token,
then one summary object per generation.
"""
from __future__ import annotations

import json
import sys

from ._common import (add_generation_options, add_model_options, add_monitor_options,
                      add_prompt_options, check_args, num, prepare_generation, printable,
                      printable_text, ranked_concepts, summary_dict, token_json)


def add_arguments(p) -> None:
    p.epilog = "example: steerkernel generate 'Tell me about your day.' --steer calm=+0.02@8-21"
    add_prompt_options(p)
    add_model_options(p)
    add_generation_options(p, max_new_tokens=64)
    add_monitor_options(p, top=5)
    p.add_argument("--compare", action="store_true",
                   help="also generate without steering (same batch, same seed) and show "
                        "both, with the change in mean z re-read on the unsteered model")
    p.add_argument("--quiet", action="store_true", help="no monitor summary on stderr")


def run(args) -> int:
    from ..live import generate_monitored, reread, top_concepts

    parsed = check_args(args)
    if args.compare and parsed["program"] is None:
        raise ValueError("--compare needs a --steer program to compare against")
    g = prepare_generation(args, parsed)
    prompt, model, tok, bank = g["prompt"], g["model"], g["tok"], g["bank"]
    li, layer, ids, names, sinks = g["li"], g["layer"], g["ids"], g["names"], g["sinks"]
    out, err = sys.stdout, sys.stderr
    rows = [ids, ids] if args.compare else [ids]
    programs = [None, parsed["program"]] if args.compare else [parsed["program"]]
    stream = not args.json and not args.compare
    has_stats, among = ranked_concepts(bank, li)
    unit = "z" if among is not None else "raw projection"

    def on_token(rec):
        if args.json:
            out.write(token_json(rec, names, li, args.top, layer, has_stats) + "\n")
        elif stream:
            out.write(printable_text(rec.text))
        else:
            return
        out.flush()

    try:
        gens = generate_monitored(
            model, tok, bank, rows, programs, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
            rules=parsed["rules"], sinks=sinks, layer=layer, backend=args.backend,
            on_token=on_token, row_seeds=[args.seed] * len(rows))
    finally:
        for s in sinks:
            s.close()
    summaries = [summary_dict(g, names, li, layer, args.top, has_stats) for g in gens]
    change = None
    if args.compare:
        rr = reread(model, tok, bank, [g.prompt_ids + g.token_ids for g in gens],
                    backend=args.backend)
        # z as the monitor computes it (a concept without statistics: its raw projection),
        # ranked like the monitor's tables (see ranked_concepts)
        mu = bank.baseline_mean[li].nan_to_num(0.0)
        sd = bank.baseline_std[li].nan_to_num(1.0).clamp_min(1e-6)
        zz = [((r[len(g.prompt_ids):, li] - mu) / sd) for r, g in zip(rr, gens)]
        means = [z.mean(0) if z.shape[0] else None for z in zz]
        if means[0] is not None and means[1] is not None:
            d = means[1] - means[0]
            order = [names.index(n) for n, _ in top_concepts(d.abs(), names, args.top, among)]
            change = {names[k]: {"unsteered": num(means[0][k]), "steered": num(means[1][k]),
                                 "change": num(d[k])} for k in order}
    if args.json:
        for s in summaries:
            out.write(json.dumps(s, ensure_ascii=False) + "\n")
        if args.compare:
            out.write(json.dumps({"event": "compare", "layer": layer,
                                  "program": parsed["program"],
                                  "unit": "z" if among is not None else "raw",
                                  "reread_mean_z": change}) + "\n")
        return 0
    if stream:
        out.write("\n")
    else:
        out.write("--- unsteered ---\n" + printable_text(gens[0].text.strip()) + "\n")
        out.write(f"--- steered ({printable(parsed['program'])}) ---\n"
                  + printable_text(gens[1].text.strip()) + "\n")
        if change:
            out.write(f"--- largest changes in mean {unit} (re-read unsteered, layer {layer})"
                      " ---\n")
            for n, v in change.items():
                out.write(f"{printable(n):<14}{v['unsteered']:+7.2f} -> {v['steered']:+7.2f}  "
                          f"({v['change']:+.2f})\n")
    out.flush()
    if not args.quiet:
        for s, g in zip(summaries, gens):
            tag = f"steering '{printable(g.program)}'" if g.program else "unsteered"
            top = ", ".join(f"{printable(n)} {v:+.2f}" for n, v in (s["top_mean"] or []))
            alarms = f"; {len(s['alarms'])} alarm(s)" if parsed["rules"] else ""
            err.write(f"[{tag}] {s['tokens']} tokens ({s['finished']}); mean {unit} at layer "
                      f"{layer}: {top or 'n/a'}{alarms}\n")
    return 0
