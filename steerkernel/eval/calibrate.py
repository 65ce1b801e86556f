"""``steerkernel calibrate``: per concept, the strength that does the most at a bounded cost.

For each concept :func:`calibrate` runs :func:`steerkernel.eval.harness.evaluate` over a grid
of positive strengths (toward the concept) and picks the recommended strength:

1. **Admissible** strengths keep the coherence cost bounded, all three measures against the
   unsteered control of the same run: perplexity ratio ``<= max_ppl_ratio`` (default 1.5),
   on-topic rate no more than ``max_topic_drop`` (default 0.15) below the control's, and
   repetition no more than ``max_repetition_rise`` (default 0.10) above it.  Point estimates
   are compared (the intervals are reported beside them).
2. With a ``target_effect``: the smallest admissible strength whose judge effect reaches it.
   Otherwise (or when none reaches it): the admissible strength with the largest positive
   judge effect; the reason says whether that effect's 95 % interval lies above 0.
3. If no strength qualifies the concept gets no recommendation, and the reason says why.

The recommendation is written into the bank's metadata
(``metadata["concepts"][name]["recommended"]``: strength, layers, the figures behind it, the
judge and when it was measured), so programs built from the bank can use it; the demo does.
For the embedded default model the recommendations measured by the project ship in
``data/calibrated_strengths.json`` (written by :func:`record`) and are merged into the default
bank when the model and the corpus are the ones they were measured on
(:func:`steerkernel.concepts.default.shipped_recommendations`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .harness import evaluate

DEFAULT_STRENGTHS = (0.005, 0.01, 0.015, 0.02, 0.03)
BOUNDS = {"max_ppl_ratio": 1.5, "max_topic_drop": 0.15, "max_repetition_rise": 0.10}


def choose(result: dict, target_effect: Optional[float] = None, *,
           max_ppl_ratio: float = BOUNDS["max_ppl_ratio"],
           max_topic_drop: float = BOUNDS["max_topic_drop"],
           max_repetition_rise: float = BOUNDS["max_repetition_rise"]) -> dict:
    """``{"recommended": row or None, "reason": str, "admissible": [strengths]}`` from one
    :func:`evaluate` result (see the module docs for the rule)."""
    rows = result["strengths"]
    base = next(r for r in rows if r["strength"] == 0)
    admissible, why_not = [], []
    for r in rows:
        if r["strength"] <= 0:
            continue
        problems = []
        ratio = (r["ppl_ratio"] or {}).get("value", math.nan)
        if not (ratio <= max_ppl_ratio):
            problems.append(f"perplexity x{ratio:.2f} > x{max_ppl_ratio:g}")
        drop = base["on_topic"]["value"] - r["on_topic"]["value"]
        if drop > max_topic_drop:
            problems.append(f"on-topic rate down {drop:.2f} > {max_topic_drop:g}")
        rise = r["repetition"]["value"] - base["repetition"]["value"]
        if rise > max_repetition_rise:
            problems.append(f"repetition up {rise:.2f} > {max_repetition_rise:g}")
        if problems:
            why_not.append(f"{r['strength']:g}: " + ", ".join(problems))
        else:
            admissible.append(r)
    out = {"admissible": [r["strength"] for r in admissible], "rejected": why_not}
    if target_effect is not None:
        hit = [r for r in admissible if r["effect"]["value"] >= target_effect]
        if hit:
            best = min(hit, key=lambda r: r["strength"])
            return {**out, "recommended": best,
                    "reason": f"smallest admissible strength reaching judge effect "
                              f"{target_effect:g}"}
    positive = [r for r in admissible if r["effect"]["value"] > 0]
    if positive:
        best = max(positive, key=lambda r: r["effect"]["value"])
        lead = "target not reached; " if target_effect is not None else ""
        sure = ("its 95% interval lies above 0" if best["effect"]["lo"] > 0 else
                "but its 95% interval reaches 0: the judge cannot confirm the effect")
        return {**out, "recommended": best,
                "reason": lead + f"admissible strength with the largest judge effect ({sure})"}
    reason = ("no admissible strength" if not admissible
              else "no admissible strength moved the judge toward the concept")
    return {**out, "recommended": None, "reason": reason}


def calibrate(model, tokenizer, bank, concepts: Sequence[str],
              strengths: Sequence[float] = DEFAULT_STRENGTHS, *,
              target_effect: Optional[float] = None, layers: Optional[str] = None,
              bounds: Optional[dict] = None, **eval_kw) -> dict:
    """Evaluate every concept over ``strengths`` and choose its recommended strength.

    Returns ``{"concepts": {name: {"recommended": {...} or None, "reason", "admissible",
    "rejected", "evaluation": evaluate(...)}}, "bounds", "target_effect"}``; the bank is not
    changed (see :func:`apply`)."""
    if not concepts:
        raise ValueError("name at least one concept to calibrate")
    if any((not math.isfinite(s)) or s <= 0 for s in strengths):
        raise ValueError("calibration strengths must be positive (toward the concept)")
    b = {**BOUNDS, **(bounds or {})}
    for c in concepts:
        bank.concept_index(c)
    out = {}
    for c in concepts:
        res = evaluate(model, tokenizer, bank, c, strengths, layers=layers, **eval_kw)
        pick = choose(res, target_effect, **b)
        rec = pick["recommended"]
        out[c] = {"recommended": None if rec is None else {
                      "strength": rec["strength"], "layers": res["layers"],
                      "effect": rec["effect"], "judge_change": rec["judge_change"],
                      "monitor_change": rec["monitor_change"], "ppl_ratio": rec["ppl_ratio"],
                      "on_topic": rec["on_topic"], "repetition": rec["repetition"],
                      "judge": res["judge"]["name"],
                      "measured_at": res["machine"]["measured_at"]},
                  "reason": pick["reason"], "admissible": pick["admissible"],
                  "rejected": pick["rejected"], "evaluation": res}
    return {"concepts": out, "bounds": b, "target_effect": target_effect}


def apply(bank, result: dict) -> None:
    """Write each calibrated concept's recommendation (or its absence, with the reason) into
    ``bank.metadata["concepts"][name]["recommended"]``."""
    meta = bank.metadata.setdefault("concepts", {})
    for c, r in result["concepts"].items():
        entry = meta.setdefault(c, {})
        entry["recommended"] = r["recommended"] if r["recommended"] is not None else \
            {"strength": None, "reason": r["reason"]}


def record(model, result: dict) -> dict:
    """The recommendations of ``result`` with the model fingerprint and the built-in corpus
    hash they hold for: the format of ``data/calibrated_strengths.json``."""
    from ..concepts.default import _corpus_sha256
    from ..introspect import model_fingerprint

    return {"version": 1, "model_fingerprint": model_fingerprint(model),
            "corpus_sha256": _corpus_sha256(), "bounds": result["bounds"],
            "target_effect": result["target_effect"],
            "concepts": {c: r["recommended"] for c, r in result["concepts"].items()
                         if r["recommended"] is not None}}


__all__ = ["calibrate", "choose", "apply", "record", "DEFAULT_STRENGTHS", "BOUNDS"]
