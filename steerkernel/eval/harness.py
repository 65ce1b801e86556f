"""``steerkernel eval``: does steering change behaviour, or just break the text?

For one concept, a list of strengths and a prompt set, :func:`evaluate` generates steered and
unsteered continuations (strength 0 is the unsteered control, same prompts, same sampler) and
reports per strength, each with a 95 % bootstrap interval over *prompts* (a prompt's figure is
the mean over its samples; see :mod:`steerkernel.stats`):

(a) **judge** -- the score of an independent judge (:mod:`steerkernel.eval.judge`; VADER
    valence by default) and its paired change from strength 0.  ``effect`` is that change
    signed toward the concept (``expected_sign``): positive means the text moved the way the
    concept's valence says it should.
(b) **coherence cost**, three measures:

    * ``ppl`` -- perplexity of the reply under the *unsteered* model, conditioned on the prompt:
      ``exp(mean_t -log p(y_t | prompt, y_<t))`` over the reply tokens; ``ppl_ratio`` is the
      geometric-mean ratio to strength 0 (1 = no cost).
    * ``repetition`` -- the share of a reply's word 3-grams that repeat an earlier 3-gram of
      the same reply (0 = none; degenerate loops approach 1).
    * ``on_topic`` -- the share of replies that still answer *their own* prompt: a reply is on
      topic when the unsteered model finds it likelier (lower mean NLL per reply token) after
      its own prompt than after each of 3 other prompts of the set (:func:`distractors`).
      This is a retrieval test with chance 1/4 that needs no labels and no topic lexicon: a
      reply about the weekend is likelier after "plans for the weekend?" than after "my
      bicycle chain keeps slipping", and a reply that drifted into a reverie is about equally
      likely after any prompt.  The unsteered rate is the ceiling steered rates are read
      against.  ``topic_pmi`` is the graded version: the mean NLL after the distractors minus
      the NLL after the own prompt, in nats per reply token (how much the own prompt explains
      the reply beyond the others); it falls as a reply drifts, before the rate does.
(c) **monitor** -- the bank's own reading: mean z of the concept over the reply tokens, re-read
    on the unsteered model at the bank's default layer (what ``steerkernel demo`` reports),
    shown beside (a), never instead of it.

Everything is seeded (sampling seed per batch, bootstrap seed) and the result is plain JSON;
:func:`plot_dose_response` draws it.
"""
from __future__ import annotations

import json
import math
import platform
import time
import warnings
from importlib import resources
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .judge import expected_sign, get_judge
from ..stats import bootstrap_ci, paired_diff_ci

#: default evaluation settings (the CLI's defaults)
DEFAULTS = {"samples": 2, "max_new_tokens": 40, "temperature": 0.7, "top_k": 40, "seed": 0,
            "batch_size": 32, "n_prompts": 16}


# ------------------------------------------------------------------------------ inputs
def load_prompts(path: Optional[str] = None) -> List[dict]:
    """Prompts as ``[{"id", "text"}]``: the built-in set (``data/eval_prompts.json``) or a
    user file -- the same JSON shape, a JSON list of strings, or a text file with one prompt
    per line."""
    if path is None:
        raw = resources.files("steerkernel").joinpath("data", "eval_prompts.json").read_text(
            encoding="utf-8")
        return json.loads(raw)["prompts"]
    from ..fileio import read_text_input, text_lines

    text = read_text_input(path, "prompt file")
    stripped = text.lstrip()
    data = None
    if stripped.startswith("{") or stripped.startswith("["):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # a .json file must parse; others may be text
            if str(path).lower().endswith(".json"):
                why = "nested too deeply" if isinstance(e, RecursionError) else e
                raise ValueError(f"{path}: not valid JSON ({why})") from None
    if data is not None:
        items = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected {{'prompts': [...]}} or a JSON list")
        out = []
        for i, p in enumerate(items):
            if isinstance(p, str):
                p = {"id": f"p{i}", "text": p}
            if not isinstance(p, dict) or not isinstance(p.get("text"), str) \
                    or not p["text"].strip():
                raise ValueError(f"{path}: prompt {i} is not a non-empty string or "
                                 "{'id', 'text'} object")
            out.append({"id": str(p.get("id", f"p{i}")), "text": p["text"]})
    else:
        out = [{"id": f"p{i}", "text": ln.strip()}
               for i, ln in enumerate(text_lines(text)) if ln.strip()]
    if len(out) < 2:
        raise ValueError(f"{path}: an evaluation needs at least 2 prompts (got {len(out)})")
    return out


def strength_program(concept: str, strength: float, layers: str) -> Optional[str]:
    """``concept=+s@layers`` (None for strength 0: the unsteered control)."""
    if not math.isfinite(strength):
        raise ValueError(f"strength must be finite, got {strength!r}")
    return None if strength == 0 else f"{concept}={strength:+g}@{layers}"


def default_layers(bank) -> str:
    """The steering layer range used when none is given: the middle of the stack
    (``steerkernel.demo.steer_layers``), restricted to the bank's layers."""
    from ..demo import steer_layers

    n = max(bank.layers) + 1
    return steer_layers(n)


# ------------------------------------------------------------------------------ measures
def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the word ``n``-grams of ``text`` that repeat an earlier one (0 if < n words)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled, leave=False)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield list(range(i, min(n, i + size)))


def topic_matches(own_nll: np.ndarray, distractor_nll: np.ndarray) -> np.ndarray:
    """``[n]`` bool: reply ``i`` is likelier (lower mean NLL) after its own prompt than after
    every distractor prompt (``distractor_nll [n, D]``); NaN (an empty reply) is never on
    topic."""
    own = np.asarray(own_nll, dtype=np.float64)
    other = np.asarray(distractor_nll, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(own) & (own[:, None] < other).all(axis=1)


def distractors(n_prompts: int, i: int, count: int = 3) -> List[int]:
    """The prompts a reply to prompt ``i`` is tested against: the next ``count`` prompts of the
    set, cyclically (deterministic, never ``i`` itself)."""
    count = min(count, n_prompts - 1)
    return [(i + j) % n_prompts for j in range(1, count + 1)]


def _score_pairs(model, tokenizer, bank, pairs, k: int, li: int, batch_size: int,
                 backend: Optional[str], bar=None):
    """For each ``(prompt_ids, reply_ids)`` pair: the mean NLL of the reply tokens given the
    prompt under the unsteered model, and the mean z of concept ``k`` at bank layer index
    ``li`` over the reply tokens (one forward per chunk with the bank attached as a monitor
    only, no program).  Empty replies give NaN."""
    from ..integrations import attach
    from ..live import right_padded

    nll = np.full(len(pairs), np.nan)
    z = np.full(len(pairs), np.nan)
    mu, sd = float(bank.baseline_mean[li, k]), float(bank.baseline_std[li, k].clamp_min(1e-6))
    for idx in _chunks(len(pairs), batch_size):
        idx = [i for i in idx if pairs[i][1]]
        if not idx:
            continue
        x, m = right_padded(model, tokenizer,
                            [list(pairs[i][0]) + list(pairs[i][1]) for i in idx])
        with attach(model, bank, monitor=True, backend=backend, max_batch=len(idx)) as h:
            with torch.no_grad():
                logits = model(input_ids=x, attention_mask=m, use_cache=False).logits
            traces = h.trace()
        for r, i in enumerate(idx):
            n_p, n_r = len(pairs[i][0]), len(pairs[i][1])
            tgt = x[r, n_p:n_p + n_r]
            logp = torch.log_softmax(logits[r, n_p - 1:n_p + n_r - 1].double(), -1)
            lp = logp.gather(-1, tgt[:, None])[:, 0]
            nll[i] = float(-lp.mean())
            z[i] = float(((traces[r][n_p:n_p + n_r, li, k].double() - mu) / sd).mean())
        if bar is not None:
            bar.update(len(idx))
    return nll, z


# ------------------------------------------------------------------------------ evaluate
def evaluate(model, tokenizer, bank, concept: str, strengths: Sequence[float], *,
             layers: Optional[str] = None, prompts: Optional[Sequence[dict]] = None,
             samples: int = DEFAULTS["samples"],
             max_new_tokens: int = DEFAULTS["max_new_tokens"],
             temperature: float = DEFAULTS["temperature"], top_k: int = DEFAULTS["top_k"],
             seed: int = DEFAULTS["seed"], batch_size: int = DEFAULTS["batch_size"],
             judge: str = "vader", direction: Optional[int] = None,
             backend: Optional[str] = None, progress: bool = True,
             keep_texts: int = 2) -> dict:
    """Dose-response of steering ``concept`` at each of ``strengths`` (``rel`` units, the
    steering grammar's default: a share of each layer's mean residual norm) over ``layers``.

    Strength 0 (the unsteered control) is added when missing.  Returns a JSON-ready dict:
    ``{"concept", "layers", "judge", "expected_sign", "settings", "strengths": [per-strength
    dict], "examples", "machine", "seconds"}``; each per-strength dict holds ``judge``,
    ``effect``, ``monitor_z``, ``monitor_change``, ``ppl``, ``ppl_ratio``, ``repetition``,
    ``on_topic``, ``topic_pmi`` as ``{"value", "lo", "hi", "n"}`` intervals (see the module
    docs).
    """
    from ..live import chat_ids, check_sampling, generate_monitored
    from ..steering import compile_program

    t0 = time.perf_counter()
    k = bank.concept_index(concept)
    sign = expected_sign(bank, concept, direction)
    judge_obj = get_judge(judge)
    check_sampling(max_new_tokens, temperature, top_k, 1.0)
    if samples < 1 or batch_size < 1:
        raise ValueError("samples and batch_size must be >= 1")
    strengths = sorted({float(s) for s in strengths} | {0.0})
    layers = default_layers(bank) if layers is None else str(layers)
    for s in strengths:  # every program compiles before any work starts
        if s != 0:
            compile_program(strength_program(concept, s, layers), bank)
    prompts = list(load_prompts() if prompts is None else prompts)
    P = len(prompts)
    if P < 2:
        raise ValueError("an evaluation needs at least 2 prompts")
    pids = [chat_ids(tokenizer, p["text"]) for p in prompts]
    li = bank.layer_index(None)

    # rows: (strength index, prompt index, sample index), grouped by strength
    rows = [(si, pi, j) for si in range(len(strengths)) for pi in range(P) for j in range(samples)]
    gens = [None] * len(rows)
    bar = _progress(len(rows), f"eval {concept}", progress)
    try:
        for ci, idx in enumerate(_chunks(len(rows), batch_size)):
            out = generate_monitored(
                model, tokenizer, bank, [pids[rows[i][1]] for i in idx],
                [strength_program(concept, strengths[rows[i][0]], layers) for i in idx],
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                seed=seed * 100003 + ci, backend=backend)
            for i, g in zip(idx, out):
                gens[i] = g
            bar.update(len(idx))
    finally:
        bar.close()
    t_gen = time.perf_counter() - t0

    texts = [g.text for g in gens]
    judged = judge_obj.score(texts)
    rep = np.array([repetition_rate(t) for t in texts])
    own = [(g.prompt_ids, g.token_ids) for g in gens]
    others = [distractors(P, r[1]) for r in rows]
    D = len(others[0])
    pairs = [(pids[o], g.token_ids) for g, os_ in zip(gens, others) for o in os_]
    bar = _progress(len(own) + len(pairs), f"read back {concept}", progress)
    try:
        nll, mz = _score_pairs(model, tokenizer, bank, own, k, li, batch_size, backend, bar)
        dnll, _ = _score_pairs(model, tokenizer, bank, pairs, k, li, batch_size, backend, bar)
    finally:
        bar.close()
    dnll = dnll.reshape(len(rows), D)
    on_topic = topic_matches(nll, dnll).astype(np.float64)
    pmi = dnll.mean(axis=1) - nll  # nats/token the own prompt explains beyond the others

    def per_prompt(values: np.ndarray) -> np.ndarray:  # [S, P] means over samples (NaN-aware)
        v = values.reshape(len(strengths), P, samples)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN prompt: stays NaN
            return np.nanmean(v, axis=2)

    J, R, N, Z, T, M = (per_prompt(a) for a in (judged, rep, nll, mz, on_topic, pmi))
    s0 = strengths.index(0.0)
    table = []
    for si, s in enumerate(strengths):
        both = ~np.isnan(N[si]) & ~np.isnan(N[s0])
        lr = paired_diff_ci(N[si][both], N[s0][both], seed=seed) if both.any() else None
        table.append({
            "strength": s,
            "program": strength_program(concept, s, layers),
            "judge": bootstrap_ci(J[si], seed=seed),
            "judge_change": paired_diff_ci(J[si], J[s0], seed=seed),
            "effect": paired_diff_ci(sign * J[si], sign * J[s0], seed=seed),
            "monitor_z": bootstrap_ci(Z[si], seed=seed),
            "monitor_change": paired_diff_ci(np.nan_to_num(Z[si]), np.nan_to_num(Z[s0]),
                                             seed=seed),
            "ppl": _exp(bootstrap_ci(N[si], seed=seed)),
            "ppl_ratio": _exp(lr) if lr else None,
            "repetition": bootstrap_ci(R[si], seed=seed),
            "on_topic": bootstrap_ci(T[si], seed=seed),
            "topic_pmi": bootstrap_ci(M[si], seed=seed),
            "empty_replies": int(sum(1 for r, g in zip(rows, gens) if r[0] == si
                                     and not g.token_ids)),
        })
    examples = []
    for pi in range(min(keep_texts, P)):
        examples.append({"prompt": prompts[pi]["text"],
                         "replies": {f"{strengths[si]:g}": gens[rows.index((si, pi, 0))].text
                                     for si in range(len(strengths))}})
    return {
        "concept": concept, "layers": layers, "bank_layer": bank.layers[li],
        "judge": judge_obj.describe(), "expected_sign": sign,
        "settings": {"samples": samples, "max_new_tokens": max_new_tokens,
                     "temperature": temperature, "top_k": top_k, "seed": seed,
                     "n_prompts": P, "topic_distractors": D,
                     "units": "rel (share of each layer's mean residual norm)",
                     "intervals": "95% percentile bootstrap over prompts"},
        "strengths": table, "examples": examples,
        "seconds": {"generate": t_gen, "total": time.perf_counter() - t0},
        "machine": _machine(),
    }


def _exp(ci: dict) -> dict:
    return {k: (math.exp(v) if k in ("value", "lo", "hi") and v is not None
                and math.isfinite(v) else v) for k, v in ci.items()}


def _machine() -> dict:
    from ..concepts.analysis import machine_info

    info = machine_info()
    info["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return info


# ------------------------------------------------------------------------------ plots
def plot_dose_response(results: Sequence[dict], path: str) -> None:
    """One row of panels per evaluated concept: judge effect, monitor change, perplexity
    ratio and on-topic rate against strength, each with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import save_png

    panels = [("effect", "judge effect\n(toward concept)"), ("monitor_change", "monitor z change"),
              ("ppl_ratio", "perplexity ratio"), ("on_topic", "on-topic rate"),
              ("topic_pmi", "topic PMI\n(nats/token)")]
    fig, axes = plt.subplots(len(results), len(panels), figsize=(16, 2.8 * len(results)),
                             squeeze=False)
    for r, res in enumerate(results):
        xs = [row["strength"] for row in res["strengths"]]
        for c, (key, label) in enumerate(panels):
            ax = axes[r][c]
            vals = [row[key] or {"value": math.nan, "lo": math.nan, "hi": math.nan}
                    for row in res["strengths"]]
            y = np.array([v["value"] for v in vals], dtype=float)
            lo = np.array([v["lo"] for v in vals], dtype=float)
            hi = np.array([v["hi"] for v in vals], dtype=float)
            ax.plot(xs, y, marker="o", ms=3)
            ax.fill_between(xs, lo, hi, alpha=0.25)
            ref = {"ppl_ratio": 1.0, "on_topic": None}.get(key, 0.0)
            if ref is not None:
                ax.axhline(ref, color="0.6", lw=0.8, ls="--")
            else:
                ax.set_ylim(0, 1.05)
            ax.set_xlabel("strength")
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{res['concept']}\n@{res['layers']}")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


__all__ = ["evaluate", "load_prompts", "strength_program", "default_layers", "repetition_rate",
           "topic_matches", "distractors", "plot_dose_response", "DEFAULTS"]
