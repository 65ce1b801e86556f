"""The first-run demo behind ``steerkernel demo``: emotion monitoring and steering on the
embedded default model, end to end.

1. load the model (the embedded SmolLM2-135M-Instruct unless told otherwise);
2. build or load the cached emotion bank (:func:`steerkernel.concepts.default.default_bank`)
   and plot the concept space (PC1 x PC2 of the emotion directions: the circumplex);
3. run the built-in scenarios (``steerkernel/data/scenarios.json``: an agent failing under a
   deadline, a grieving user, ...) twice in one batch -- unsteered and steered (default: more
   calm, less desperate, at the strengths and layers ``steerkernel calibrate`` recommended for
   the bank, else 0.02 at the middle third of the layers) -- monitoring every layer;
4. print per-token emotion traces (z-scores at the bank's default layer) and write the
   trajectory plots;
5. show side by side what steering changed: the two texts, and the mean z of the watched
   emotions over the generated tokens.  Both texts are *re-read on the unsteered model* for
   that comparison, so the numbers measure the text the steered model wrote, not the edit
   applied to its activations (the in-run monitor of a steered model sees its own edits).

Everything is written to the output directory: ``concept_circumplex.png``,
``trajectory_<scenario>.png``, ``steering_effect.png`` and ``summary.json``.
:func:`run_demo` returns the summary dict.
"""
from __future__ import annotations

import json
import os
import textwrap
import time
from typing import Callable, List, Optional, Sequence

import torch

from .fileio import save_png

#: the concepts the side-by-side table always reports (when the bank has them)
REPORT = ("calm", "desperate", "afraid", "nervous", "happy", "sad")
SPARK = "▁▂▃▄▅▆▇█"


# ------------------------------------------------------------------------------ scenarios
def load_scenarios() -> List[dict]:
    """The built-in scenarios (``steerkernel/data/scenarios.json``)."""
    from importlib import resources

    ref = resources.files("steerkernel").joinpath("data", "scenarios.json")
    return json.loads(ref.read_text(encoding="utf-8"))["scenarios"]


def steer_layers(n_layers: int) -> str:
    """The middle third-ish of the decoder stack, as a steering layer range (``8-21`` of 30)."""
    a = max(0, round(0.27 * (n_layers - 1)))
    b = max(a, round(0.72 * (n_layers - 1)))
    return f"{a}-{b}" if b > a else f"{a}"


def default_program(n_layers: int, strength: float = 0.02) -> str:
    """More calm, less desperate: ``calm=+s@mid; desperate=-s@mid`` (``rel`` units: a share
    of each layer's mean residual norm, added at every layer of the range)."""
    r = steer_layers(n_layers)
    return f"calm=+{strength:g}@{r}; desperate=-{strength:g}@{r}"


def calibrated_program(bank, n_layers: int) -> Optional[str]:
    """``calm=+a@A; desperate=-b@B`` from the strengths :func:`steerkernel.eval.calibrate`
    recommended for this bank (``metadata["concepts"][name]["recommended"]``), or None when
    either concept has none."""
    recs = {}
    for name in ("calm", "desperate"):
        rec = bank.recommended(name) if name in bank.names else None
        if rec is None:
            return None
        recs[name] = (rec["strength"], rec.get("layers") or steer_layers(n_layers))
    return (f"calm=+{recs['calm'][0]:g}@{recs['calm'][1]}; "
            f"desperate=-{recs['desperate'][0]:g}@{recs['desperate'][1]}")


def user_span(tokenizer, messages: Sequence[dict], n_prompt: int) -> tuple:
    """``(start, end)`` token positions of the last user message inside the rendered prompt
    (falls back to the whole prompt)."""
    try:
        content = [m for m in messages if m.get("role") == "user"][-1]["content"]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=True)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        else:
            text = "\n".join(m["content"] for m in messages)
            enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        lo = text.rfind(content)
        hi = lo + len(content)
        idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= lo
               and b <= hi + 1]
        if lo >= 0 and idx and len(enc["input_ids"]) == n_prompt:
            return idx[0], idx[-1] + 1
    except Exception:  # noqa: BLE001 - a display nicety only
        pass
    return 0, n_prompt


# ------------------------------------------------------------------------------ text helpers
def sparkline(values: Sequence[float], lo: float = -3.0, hi: float = 3.0) -> str:
    """One block character per value, ``lo`` -> ▁ ... ``hi`` -> █ (clipped)."""
    out = []
    for v in values:
        f = (min(max(float(v), lo), hi) - lo) / (hi - lo)
        out.append(SPARK[min(int(f * len(SPARK)), len(SPARK) - 1)])
    return "".join(out)


def side_by_side(left: str, right: str, width: int = 46, titles=("", "")) -> List[str]:
    """Two texts in columns of ``width`` characters."""
    def wrap(t):
        lines = []
        for para in t.replace("\r", "").split("\n"):
            lines.extend(textwrap.wrap(para, width) or [""])
        return lines
    a, b = wrap(left), wrap(right)
    rows = [f"{titles[0][:width]:<{width}} | {titles[1][:width]}"] if any(titles) else []
    rows.append("-" * width + "-+-" + "-" * width)
    for i in range(max(len(a), len(b))):
        rows.append(f"{a[i] if i < len(a) else '':<{width}} | {b[i] if i < len(b) else ''}")
    return rows


# ------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(x: torch.Tensor, w: int = 5) -> torch.Tensor:
    if x.numel() < 3 or w <= 1:
        return x
    k = torch.ones(1, 1, w) / w
    xp = torch.nn.functional.pad(x[None, None].float(), (w // 2, w - 1 - w // 2), mode="replicate")
    return torch.nn.functional.conv1d(xp, k)[0, 0]


def plot_trajectory(res: dict, names: List[str], layer: int, path: str) -> None:
    """Two panels: the baseline run's user message + response (z per token, smoothed line over
    the raw points), and the response re-read: baseline (solid) vs steered (dashed)."""
    plt = _plt()
    watch = res["watch"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    zp, zb = res["z_prompt_user"], res["z_base"]
    full = torch.cat([zp, zb]) if zb.numel() else zp
    x = torch.arange(full.shape[0])
    for j, c in enumerate(watch):
        k = names.index(c)
        col = colors[j % len(colors)]
        a1.plot(x, full[:, k], ".", color=col, alpha=0.3, ms=3)
        a1.plot(x, _smooth(full[:, k]), color=col, lw=1.8, label=c)
    a1.axvline(zp.shape[0] - 0.5, color="0.3", ls=":", lw=1)
    a1.text(zp.shape[0], a1.get_ylim()[1], " response", va="top", fontsize=8, color="0.3")
    a1.axhline(0, color="0.85", lw=0.8)
    a1.set_title(f"{res['name']}: user message and unsteered response "
                 f"(z at layer {layer}; line = 5-token mean)", fontsize=10)
    a1.set_xlabel("token")
    a1.set_ylabel("z-score")
    a1.legend(fontsize=8, ncol=len(watch))
    zs = res["z_steer"]
    for j, c in enumerate(watch):
        k = names.index(c)
        col = colors[j % len(colors)]
        if zb.numel():
            a2.plot(torch.arange(zb.shape[0]), _smooth(zb[:, k]), color=col, lw=1.8,
                    label=f"{c} baseline")
        if zs.numel():
            a2.plot(torch.arange(zs.shape[0]), _smooth(zs[:, k]), color=col, lw=1.8, ls="--",
                    label=f"{c} steered")
    a2.axhline(0, color="0.85", lw=0.8)
    a2.set_title(f"response re-read unsteered: baseline (solid) vs steered (dashed): "
                 f"{res['program']}", fontsize=10)
    a2.set_xlabel("generated token")
    a2.set_ylabel("z-score")
    a2.legend(fontsize=7, ncol=len(watch))
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_effect(results: List[dict], concepts: List[str], path: str) -> None:
    """Grouped bars: change of mean z (steered - baseline, re-read) per concept, per scenario."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(concepts)), 4))
    n = len(results)
    w = 0.8 / max(n, 1)
    for i, r in enumerate(results):
        d = [r["summary"][c]["change"] or 0.0 for c in concepts]
        ax.bar([j + (i - (n - 1) / 2) * w for j in range(len(concepts))], d, w,
               label=r["name"])
    ax.set_xticks(range(len(concepts)))
    ax.set_xticklabels(concepts)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_ylabel("Δ mean z over generated tokens")
    ax.set_title("what steering changed in the text (re-read unsteered)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------ the op demo
def op_demo(backend: Optional[str] = None, echo: Callable[[str], None] = print) -> int:
    """The junction op alone on random data: one token per intervention kind, and a timing."""
    from . import backends
    from .ops import junction

    torch.manual_seed(0)
    T, d, K = 4, 576, 3
    names = ["calm", "desperate", "afraid"]
    residual, x = torch.randn(T, d), torch.randn(T, d)
    V = torch.nn.functional.normalize(torch.randn(K, d), dim=1)
    # slot 1: add 2.0 along "calm"; slot 2: ablate "desperate"; slot 3: cap "afraid" at 0.5
    shift, lo, hi = torch.zeros(4, K), torch.full((4, K), -torch.inf), torch.full((4, K), torch.inf)
    shift[1, 0] = 2.0
    lo[2, 1] = hi[2, 1] = 0.0
    hi[3, 2] = 0.5
    slot = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    name = backends.resolve(residual.device, backend)
    before = (residual + x) @ V.T
    junction(residual, V, x, slot, shift, lo, hi, weight=torch.ones(d), backend=backend)
    after = residual @ V.T
    echo(f"junction op on backend {name!r}: T={T} tokens, d={d}, K={K} concepts")
    echo(f"{'token':<6}{'slot':<26}" + "".join(f"{n + ' before->after':>26}" for n in names))
    labels = ["0 (monitor only)", "1 (add 2.0 calm)", "2 (ablate desperate)",
              "3 (cap afraid at 0.5)"]
    for t in range(T):
        cells = "".join(f"{float(before[t, k]):>12.3f} -> {float(after[t, k]):<10.3f}"
                        for k in range(K))
        echo(f"{t:<6}{labels[t]:<26}{cells}")
    T2 = 512
    r2, x2 = torch.randn(T2, d), torch.randn(T2, d)
    s2 = torch.randint(0, 4, (T2,), dtype=torch.int32)
    junction(r2, V, x2, s2, shift, lo, hi, weight=torch.ones(d), backend=backend)
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        junction(r2, V, x2, s2, shift, lo, hi, weight=torch.ones(d), backend=backend)
    dt = (time.perf_counter() - t0) / n
    echo(f"\n{T2} tokens x d={d} x K={K}, fused add+project+steer+RMSNorm: "
         f"{dt * 1e6:.0f} us per call ({T2 / dt / 1e6:.2f} M tokens/s) on this CPU")
    return 0


# ------------------------------------------------------------------------------ the demo
def _mean(z: torch.Tensor, k: int) -> Optional[float]:
    return float(z[:, k].mean()) if z.shape[0] else None


def _fmt(v: Optional[float]) -> str:
    return "   n/a" if v is None else f"{v:+6.2f}"


def run_demo(out_dir: str = "steerkernel-demo", *, model=None, tokenizer=None, bank=None,
             model_name: Optional[str] = None, bank_path: Optional[str] = None, quick: bool = False,
             scenarios: Optional[Sequence[str]] = None, program: Optional[str] = None,
             max_new_tokens: Optional[int] = None, layer: Optional[int] = None,
             temperature: float = 0.0, repetition_penalty: float = 1.3, seed: int = 0,
             plots: bool = True, progress: bool = True, backend: Optional[str] = None,
             table_tokens: Optional[int] = None,
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo (see the module docs); returns the summary also written to
    ``out_dir/summary.json``.

    ``quick``: only the ``deadline_agent`` scenario and 12 new tokens (tests, a first look).
    ``program``: the steering program (default :func:`default_program`).  Generation is greedy
    (``temperature`` 0) with a mild repetition penalty, so the baseline and steered runs differ
    only by the steering.
    """
    from .concepts.default import default_bank, default_bank_path
    from .introspect import text_config
    from .live import chat_ids, generate_monitored, load_model_quietly, reread, token_cell
    from .models import DEFAULT_NAME
    from .steering import compile_program

    t_start = time.perf_counter()
    all_scen = load_scenarios()
    known = [s["name"] for s in all_scen]
    if scenarios is None:
        scenarios = ["deadline_agent"] if quick else known
    bad = [s for s in scenarios if s not in known]
    if bad:
        raise ValueError(f"unknown scenario(s) {bad} (built-in: {', '.join(known)})")
    if not scenarios:
        raise ValueError("no scenarios to run")
    chosen = [next(s for s in all_scen if s["name"] == n) for n in scenarios]
    if max_new_tokens is None:
        max_new_tokens = 12 if quick else 48
    if table_tokens is None:
        table_tokens = 12 if quick else 24
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output path {out_dir!r} exists and is not a directory")

    # 1. model
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model_quietly(model_name)
    cfg = text_config(model)
    n_layers = int(cfg.num_hidden_layers)
    shown_name = os.path.basename(str(getattr(cfg, "name_or_path", "") or model_name
                                      or DEFAULT_NAME).rstrip("/"))
    echo(f"steerkernel demo: emotion monitoring and steering on {shown_name}"
         f" ({n_layers} layers, d={cfg.hidden_size}); output in {out_dir}")
    echo(f"[1/5] model loaded in {time.perf_counter() - t0:.1f} s")

    # 2. bank
    t0 = time.perf_counter()
    if bank is None and bank_path is not None:
        from .concepts import ConceptBank

        bank = ConceptBank.load(bank_path)
        bank.check_fits(model)
        how = f"loaded from {bank_path}"
    elif bank is None:
        cached = os.path.isfile(default_bank_path(model))
        bank = default_bank(model, tokenizer, progress=progress)
        how = "loaded from cache" if cached else "extracted from the built-in corpus and cached"
    else:
        bank.check_fits(model)
        how = "given"
    if layer is not None:
        bank.layer_index(layer)  # BankMismatchError lists the bank's layers
    layer = bank.layers[bank.layer_index(layer)]
    li = bank.layer_index(layer)
    names = bank.names
    probe = (bank.metadata.get("probe") or {}).get("heldout_accuracy") or {}
    acc = probe.get(str(bank.default_layer))
    acc_s = f"; held-out probe accuracy {acc:.2f} (chance {1 / bank.K:.2f})" if acc else ""
    echo(f"[2/5] concept bank: {bank.K} concepts x {bank.L} layers, default layer "
         f"{bank.default_layer}{acc_s}; {how} in {time.perf_counter() - t0:.1f} s")
    if program is None:
        program = calibrated_program(bank, n_layers)
        source = "calibrated strengths (steerkernel calibrate)" if program else \
            "default strengths (this bank has no calibrated ones)"
        program = program or default_program(n_layers)
    else:
        source = "given"
    compile_program(program, bank)  # unknown concepts / layers: fail before anything is written
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    geometry = None
    if bank.K >= 3:
        from .concepts.analysis import valence_arousal

        try:
            geometry = valence_arousal(bank, layer)
        except Exception:  # noqa: BLE001 - informative only
            geometry = None
        if geometry and geometry.get("r_pc1_valence") is not None:
            echo(f"      concept space at layer {layer}: PC1 ({100 * geometry['explained_pc1']:.0f}%"
                 f" of variance) vs valence r={geometry['r_pc1_valence']:+.2f}; PC2 "
                 f"({100 * geometry['explained_pc2']:.0f}%) vs arousal "
                 f"r={geometry['r_pc2_arousal']:+.2f}")
        if plots:
            from .concepts.analysis import plot_circumplex

            files["circumplex"] = os.path.join(out_dir, "concept_circumplex.png")
            plot_circumplex(bank, files["circumplex"], layer)

    # 3. generate: every scenario unsteered and steered, in one batch
    prompts, spans = [], []
    for s in chosen:
        ids = chat_ids(tokenizer, s["messages"])
        prompts.append(ids)
        spans.append(user_span(tokenizer, s["messages"], len(ids)))
    mode = "greedy" if temperature == 0 else f"temperature {temperature:g}"
    echo(f"[3/5] generating {len(chosen)} scenario(s) x (unsteered, steered with '{program}': "
         f"{source}), up to {max_new_tokens} tokens each, {mode}, repetition penalty "
         f"{repetition_penalty:g} ...")
    t0 = time.perf_counter()
    B = len(chosen)
    rows = prompts + prompts
    progs = [None] * B + [program] * B
    from tqdm.auto import tqdm

    bar = tqdm(total=2 * B * max_new_tokens, desc="generate", unit="tok", leave=False,
               disable=not progress)
    try:
        gens = generate_monitored(model, tokenizer, bank, rows, progs,
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  repetition_penalty=repetition_penalty, seed=seed, layer=layer,
                                  backend=backend, on_token=lambda rec: bar.update(1))
    finally:
        bar.close()
    t_gen = time.perf_counter() - t0
    n_tok = sum(len(g.token_ids) for g in gens)
    # re-read every generated text on the unsteered model
    rr = reread(model, tokenizer, bank, [g.prompt_ids + g.token_ids for g in gens],
                backend=backend)
    mu = bank.baseline_mean[li].nan_to_num(0.0)
    sd = bank.baseline_std[li].nan_to_num(1.0).clamp_min(1e-6)
    echo(f"      {n_tok} tokens in {t_gen:.1f} s ({n_tok / max(t_gen, 1e-9):.1f} tokens/s, "
         f"{2 * B} rows batched, every layer monitored)")

    results = []
    for i, s in enumerate(chosen):
        base, steer = gens[i], gens[B + i]
        nb, ns = len(base.token_ids), len(steer.token_ids)
        zb = (rr[i][len(base.prompt_ids):, li] - mu) / sd if nb else torch.zeros(0, bank.K)
        zs = (rr[B + i][len(steer.prompt_ids):, li] - mu) / sd if ns else torch.zeros(0, bank.K)
        a, b_ = spans[i]
        zp = (base.prompt_scores[a:b_, li] - mu) / sd
        zrun = steer.z[:, li] if ns else torch.zeros(0, bank.K)
        watch = [c for c in s.get("watch", []) if c in names] or list(names[:4])
        report = [c for c in dict.fromkeys(
            [st.concept for st in compile_program(program, bank).program.steers]
            + list(REPORT) + watch) if c in names]
        summary = {}
        for c in report:
            k = names.index(c)
            mb, ms = _mean(zb, k), _mean(zs, k)
            summary[c] = {"baseline": mb, "steered": ms,
                          "change": None if mb is None or ms is None else ms - mb,
                          "steered_in_run": _mean(zrun, k), "prompt": _mean(zp, k)}
        results.append({"name": s["name"], "title": s.get("title", s["name"]), "watch": watch,
                        "program": program, "baseline_text": base.text,
                        "steered_text": steer.text, "baseline_tokens": nb, "steered_tokens": ns,
                        "baseline_pieces": base.pieces, "summary": summary,
                        "z_prompt_user": zp, "z_base": zb, "z_steer": zs})

    # 4. per-token traces
    echo(f"[4/5] per-token emotion traces (z-scores at layer {layer}; sparkline {SPARK[0]} = "
         f"z<=-3 ... {SPARK[-1]} = z>=+3)")
    for r in results:
        echo("")
        echo(f"  {r['name']}: {r['title']}")
        zp, zb = r["z_prompt_user"], r["z_base"]
        w = max(len(c) for c in r["watch"])
        echo(f"    {'':<{w}}  user message ({zp.shape[0]} tokens)  | unsteered response "
             f"({zb.shape[0]} tokens)")
        for c in r["watch"]:
            k = names.index(c)
            sp = sparkline(zp[:, k].tolist())
            if len(sp) > 40:  # condense the prompt: 40 buckets of mean z
                chunks = torch.tensor_split(zp[:, k], 40)
                sp = sparkline([float(ch.mean()) for ch in chunks])
            echo(f"    {c:<{w}}  {sp:<40} {_fmt(_mean(zp, k))} | {sparkline(zb[:, k].tolist())}"
                 f" {_fmt(_mean(zb, k))}")
        if r is results[0] and zb.shape[0]:
            n = min(table_tokens, zb.shape[0])
            echo(f"    first {n} tokens of the unsteered response:")
            echo("    " + f"{'#':>3}  {'token':<14}" + "".join(f"{c[:9]:>10}" for c in r["watch"])
                 + "   top concept")
            for t in range(n):
                row = zb[t]
                top = int(row.argmax())
                echo("    " + f"{t:>3}  {token_cell(r['baseline_pieces'][t], 14)}"
                     + "".join(f"{float(row[names.index(c)]):>+10.2f}" for c in r["watch"])
                     + f"   {names[top]} {float(row[top]):+.2f}")
        if plots:
            path = os.path.join(out_dir, f"trajectory_{r['name']}.png")
            plot_trajectory(r, names, layer, path)
            files[f"trajectory_{r['name']}"] = path

    # 5. side by side
    echo("")
    echo(f"[5/5] what steering ('{program}') changed; both texts re-read on the unsteered model,"
         f" mean z over the generated tokens at layer {layer}")
    for r in results:
        echo("")
        echo(f"  {r['name']}")
        for line in side_by_side(r["baseline_text"], r["steered_text"],
                                 titles=("unsteered", "steered")):
            echo("    " + line)
        echo("")
        echo(f"    {'concept':<12}{'unsteered':>10}{'steered':>10}{'change':>10}"
             f"{'in-run':>10}")
        for c, v in r["summary"].items():
            echo(f"    {c:<12}{_fmt(v['baseline']):>10}{_fmt(v['steered']):>10}"
                 f"{_fmt(v['change']):>10}{_fmt(v['steered_in_run']):>10}")
    concepts = list(results[0]["summary"])
    overall = {}
    for c in concepts:
        ch = [r["summary"][c]["change"] for r in results if r["summary"][c]["change"] is not None]
        overall[c] = sum(ch) / len(ch) if ch else None
    echo("")
    echo("  mean change over scenarios: " + ", ".join(
        f"{c} {_fmt(v).strip()}" for c, v in overall.items()))
    echo("  ('in-run' = what the monitor saw while the steered model generated: it includes the "
         "edits of the steered layers below this one)")
    if plots and results:
        files["steering_effect"] = os.path.join(out_dir, "steering_effect.png")
        plot_effect(results, concepts, files["steering_effect"])
    wall = time.perf_counter() - t_start
    summary = {
        "model": str(shown_name), "layers": n_layers, "bank": repr(bank),
        "layer": layer, "program": program, "program_source": source,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature, "repetition_penalty": repetition_penalty, "seed": seed,
        "geometry": geometry, "generation_seconds": round(t_gen, 2),
        "generated_tokens": n_tok, "wall_seconds": round(wall, 2), "files": files,
        "mean_change": overall,
        "scenarios": [{k: v for k, v in r.items() if not k.startswith("z_")
                       and k != "baseline_pieces"} for r in results],
    }
    files["summary"] = os.path.join(out_dir, "summary.json")
    with open(files["summary"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    echo("")
    echo(f"wrote {len(files)} files to {out_dir}: "
         + ", ".join(os.path.basename(p) for p in files.values()))
    echo(f"done in {wall:.1f} s")
    return summary


__all__ = ["run_demo", "op_demo", "load_scenarios", "default_program", "steer_layers",
           "sparkline", "side_by_side"]
