"""``steerkernel monitor``: stream a generation with a live per-token table of the top concepts.

Each row appears as soon as the token's projections are known (the forward after it was
sampled): the token, then the ``--top`` concepts by z-score at the chosen layer.  Alarms
(``--alarm 'desperate z > 2 for 8'``) print as they fire; ``--steer`` steers the generation
(the table then shows what the steered model's residual stream holds at that layer, edits of
the steered layers below it included).  ``--json`` prints one JSON object per token and a
summary object instead of the table.
"""
from __future__ import annotations

import os
import sys

from ._common import (add_generation_options, add_model_options, add_monitor_options,
                      add_prompt_options, prepare_generation, printable, printable_text,
                      ranked_concepts, summary_dict, token_json)


def add_arguments(p) -> None:
    p.epilog = ("example: steerkernel monitor --scenario deadline_agent --alarm "
                "'desperate z > 1.5 for 4' --steer 'calm=+0.02@8-21'")
    add_prompt_options(p)
    add_model_options(p)
    add_generation_options(p, max_new_tokens=48)
    add_monitor_options(p, top=3)


def run(args) -> int:
    from ..live import generate_monitored, token_cell, top_concepts

    g = prepare_generation(args)
    parsed, prompt, model, tok, bank = g["parsed"], g["prompt"], g["model"], g["tok"], g["bank"]
    li, layer, ids, names, sinks = g["li"], g["layer"], g["ids"], g["names"], g["sinks"]
    out = sys.stdout
    n_prompt = len(ids)
    width = 16
    has_stats, among = ranked_concepts(bank, li)

    if not args.json:
        model_name = os.path.basename(str(getattr(model.config, "name_or_path", "") or "model"))
        mode = "greedy" if args.temperature == 0 else (
            f"temperature {args.temperature:g}, top-k {args.top_k}, seed {args.seed}")
        out.write(f"model {model_name}, bank {bank.K} concepts x {bank.L} layers, layer {layer}"
                  f", {mode}; steering: {printable(parsed['program'] or 'none')}\n")
        out.write(f"prompt: {n_prompt} tokens\n")
        n_without = int((~has_stats).sum())
        if among is None:
            what = "raw projection: the bank has no baseline statistics"
        elif n_without:
            what = f"z; {n_without} without baseline statistics not ranked"
        else:
            what = "z"
        out.write(f"{'#':>4}  {'token':<{width}}  top {args.top} concepts ({what} at layer "
                  f"{layer})\n")
        out.flush()

    def on_token(rec):
        if args.json:
            out.write(token_json(rec, names, li, args.top, layer, has_stats) + "\n")
        else:
            cells = "  ".join(f"{printable(n)} {v:+.2f}"
                              for n, v in top_concepts(rec.z[li], names, args.top, among))
            out.write(f"{rec.index:>4}  {token_cell(rec.text, width)}  {cells}\n")
        out.flush()

    def on_alarm(row, ev):
        if args.json:
            return  # alarms are in the summary object (and the JSONL log)
        where = ev.token - n_prompt
        at = f"generated token {where}" if where >= 0 else f"prompt token {ev.token}"
        out.write(f"  ! alarm '{printable(ev.rule)}' fired at {at} (value {ev.value:+.2f})\n")
        out.flush()

    try:
        gen = generate_monitored(
            model, tok, bank, [ids], [parsed["program"]], max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
            rules=parsed["rules"], sinks=sinks, layer=layer, backend=args.backend,
            on_token=on_token, on_alarm=on_alarm)[0]
    finally:
        for s in sinks:
            s.close()
    summary = summary_dict(gen, names, li, layer, max(args.top, 5), has_stats)
    if args.json:
        import json

        out.write(json.dumps(summary, ensure_ascii=False) + "\n")
        return 0
    out.write(f"\n{len(gen.token_ids)} tokens generated (stopped: {gen.finished})\n")
    if summary["top_mean"]:
        unit = "z" if among is not None else "raw projection"
        out.write(f"mean {unit} over the generated tokens at layer {layer}: " + ", ".join(
            f"{printable(n)} {v:+.2f}" for n, v in summary["top_mean"]) + "\n")
    if parsed["rules"]:
        out.write(f"alarms fired: {len(gen.alarms)}\n")
    out.write("text: " + printable_text(gen.text.strip()) + "\n")
    return 0
