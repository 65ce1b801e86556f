"""Analysis of a concept bank: the geometry of the concept space and how well it reads text.

* :func:`concept_pca` -- principal components of the K unit concept directions at a layer
  (centred over concepts): ``coords [K, n]``, variance explained per component.
* :func:`valence_arousal` -- Pearson correlation of PC1 / PC2 coordinates with the concepts'
  valence and arousal ratings (from the bank's metadata; a PC's sign is arbitrary, so |r|
  is what matters).
* :func:`heldout_means` + :func:`probe_accuracy` -- held-out top-1 probe: each held-out text
  (every ``holdout_every``-th text of each concept, never used for the directions) is assigned
  the concept with the highest z-scored mean projection among a chosen set; accuracy per
  layer.
* :func:`series_tracking` -- z-scores of one concept along an ordered series of texts (e.g.
  ``rising_danger``) and their Spearman rank correlation with the series position.
* :func:`plot_circumplex`, :func:`plot_probe_curve` -- PNG plots (matplotlib, Agg backend).

``python -m steerkernel.concepts.analysis --out FILE.json [--plots DIR]`` extracts the default
bank on the default model and writes every figure with the machine it was measured on.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UnknownConceptError
from ..fileio import atomic_write_bytes, save_png
from .bank import ConceptBank
from .corpus import Corpus, load_corpus

#: the eight emotions the probe target is stated for (chance = 1/8)
EIGHT = ("happy", "sad", "afraid", "angry", "calm", "desperate", "loving", "disgusted")


# ------------------------------------------------------------------------------ statistics
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences (NaN when one is constant)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"pearson needs two sequences of equal length >= 2 "
                         f"(got {x.numel()} and {y.numel()})")
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else math.nan


def ranks(x: Sequence[float]) -> Tensor:
    """1-based ranks with ties given their average rank."""
    x = torch.as_tensor(x, dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    for v in torch.unique(x):
        tie = x == v
        if int(tie.sum()) > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    return pearson(ranks(x), ranks(y))


# ------------------------------------------------------------------------------ geometry
def _names(bank: ConceptBank, names: Optional[Sequence[str]]) -> List[str]:
    names = list(bank.names if names is None else names)
    for n in names:
        bank.concept_index(n)
    return names


def concept_pca(bank: ConceptBank, layer: Optional[int] = None,
                names: Optional[Sequence[str]] = None) -> dict:
    """PCA of the unit concept directions ``V [K, d]`` at ``layer`` (centred over concepts).

    Returns ``{"layer", "names", "coords" [K, n] list, "explained" [n] list}``: ``coords`` are
    the concepts' coordinates on the components, ``explained`` each component's share of the
    total variance (``s_i^2 / sum s^2`` of the centred matrix's singular values).
    """
    names = _names(bank, names)
    if len(names) < 3:
        raise ValueError("concept PCA needs at least 3 concepts")
    V = bank.vectors(layer)[[bank.concept_index(n) for n in names]].double()
    Vc = V - V.mean(0, keepdim=True)
    U, S, Vh = torch.linalg.svd(Vc, full_matrices=False)
    explained = S ** 2 / (S ** 2).sum()
    coords = Vc @ Vh.T
    return {"layer": bank.default_layer if layer is None else int(layer), "names": names,
            "coords": coords.tolist(), "explained": explained.tolist()}


def ratings(bank: ConceptBank, key: str, names: Sequence[str]) -> Optional[List[float]]:
    """``metadata["concepts"][name][key]`` for every name, or None if any is missing."""
    meta = bank.metadata.get("concepts") or {}
    vals = [meta.get(n, {}).get(key) for n in names]
    return None if any(not isinstance(v, (int, float)) for v in vals) else [float(v) for v in vals]


def valence_arousal(bank: ConceptBank, layer: Optional[int] = None,
                    names: Optional[Sequence[str]] = None) -> dict:
    """Pearson r of PC1 and PC2 coordinates with valence and arousal (see module docs)."""
    pca = concept_pca(bank, layer, names)
    out = {"layer": pca["layer"], "explained_pc1": pca["explained"][0],
           "explained_pc2": pca["explained"][1] if len(pca["explained"]) > 1 else 0.0}
    coords = torch.tensor(pca["coords"])
    for key in ("valence", "arousal"):
        vals = ratings(bank, key, pca["names"])
        for pc in (1, 2):
            out[f"r_pc{pc}_{key}"] = (None if vals is None or coords.shape[1] < pc
                                      else pearson(coords[:, pc - 1].tolist(), vals))
    return out


# ------------------------------------------------------------------------------ probing
def _offset(bank: ConceptBank) -> int:
    from .extract import _bank_offset

    return _bank_offset(bank)


def heldout_means(model, tokenizer, bank: ConceptBank, corpus: Optional[Corpus] = None,
                  names: Optional[Sequence[str]] = None, holdout_every: Optional[int] = None,
                  batch_size: int = 16, progress: bool = False):
    """``(means [N, L, d], labels)``: the mean residual (bank layers, bank token offset) of
    every held-out text of ``names`` (default: the concepts the corpus and bank share), and
    each text's concept name.  The hold-out period defaults to the bank's."""
    from .extract import collect_activations

    corpus = load_corpus(None) if corpus is None else corpus
    if names is None:
        names = [n for n in bank.names if n in corpus.texts]
    names = _names(bank, names)
    missing = [n for n in names if n not in corpus.texts]
    if missing:
        raise UnknownConceptError(f"concepts {missing} have no texts in corpus {corpus.source}")
    every = holdout_every if holdout_every is not None else \
        int((bank.metadata.get("params") or {}).get("holdout_every", 5))
    _, held = corpus.split(every)
    texts = [t for n in names for t in held[n]]
    if not texts:
        raise ValueError(f"no held-out texts (hold-out period {every})")
    acts = collect_activations(model, tokenizer, texts, bank.layers, start_offset=_offset(bank),
                               batch_size=batch_size, progress=progress, desc="held-out")
    return acts.means, [n for n in names for _ in held[n]]


def probe_accuracy(bank: ConceptBank, means: Tensor, labels: Sequence[str],
                   names: Optional[Sequence[str]] = None) -> dict:
    """Top-1 probe accuracy per bank layer among ``names`` (default: every label present).

    Each text's mean residual ``a = means[i] [L, d]`` is scored
    ``z_k = (v_k . a - baseline_mean_k) / baseline_std_k`` for the concepts in ``names`` and
    assigned the argmax; texts of other concepts are ignored.  Returns ``{"names", "n",
    "chance", "per_layer": {layer: acc}, "confusion": {layer: [[count]]}}`` (confusion rows:
    true concept, columns: predicted).
    """
    names = _names(bank, sorted(set(labels), key=list(labels).index) if names is None
                   else names)
    keep = [i for i, lab in enumerate(labels) if lab in names]
    if not keep:
        raise ValueError(f"no texts of {names} to probe")
    y = torch.tensor([names.index(labels[i]) for i in keep])
    idx = [bank.concept_index(n) for n in names]
    V = bank.directions[:, idx]                                    # [L, k, d]
    p = torch.einsum("nld,lkd->nlk", means[keep].float(), V)
    z = (p - bank.baseline_mean[:, idx]) / bank.baseline_std[:, idx].clamp_min(1e-12)
    pred = z.argmax(-1)                                            # [N, L]
    per_layer, confusion = {}, {}
    for i, layer in enumerate(bank.layers):
        per_layer[layer] = float((pred[:, i] == y).float().mean())
        cm = torch.zeros(len(names), len(names), dtype=torch.long)
        cm.index_put_((y, pred[:, i]), torch.ones_like(y), accumulate=True)
        confusion[layer] = cm.tolist()
    return {"names": list(names), "n": len(keep), "chance": 1.0 / len(names),
            "per_layer": per_layer, "confusion": confusion}


def series_tracking(model, tokenizer, bank: ConceptBank, texts: Sequence[str], concept: str,
                    layer: Optional[int] = None) -> dict:
    """z-score of ``concept`` on each text of an ordered series (via :func:`score_texts`, i.e.
    the junction op) and the Spearman correlation of those z-scores with the position."""
    from .extract import score_texts

    k = bank.concept_index(concept)
    if len(texts) < 3:
        raise ValueError("a series needs at least 3 texts")
    scores, z = score_texts(model, tokenizer, bank, list(texts), layer)
    zk = z[:, k].tolist()
    return {"concept": concept, "layer": bank.default_layer if layer is None else int(layer),
            "z": zk, "spearman": spearman(list(range(len(zk))), zk)}


# ------------------------------------------------------------------------------ plots
def plot_circumplex(bank: ConceptBank, path: str, layer: Optional[int] = None,
                    names: Optional[Sequence[str]] = None) -> None:
    """Concepts placed on PC1 x PC2 of the concept directions, coloured by valence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pca = concept_pca(bank, layer, names)
    xy = torch.tensor(pca["coords"])[:, :2]
    val = ratings(bank, "valence", pca["names"])
    fig, ax = plt.subplots(figsize=(7, 6))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=val if val else "tab:blue", cmap="coolwarm", s=40)
    for (x, y), n in zip(xy.tolist(), pca["names"]):
        ax.annotate(n, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    if val:
        fig.colorbar(sc, ax=ax, label="valence")
    ex = pca["explained"]
    ax.set_xlabel(f"PC1 ({100 * ex[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ex[1]:.1f}% of variance)")
    ax.set_title(f"concept space at layer {pca['layer']}")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    save_png(fig, path)
    plt.close(fig)


def plot_probe_curve(per_layer: Dict[int, float], path: str, chance: Optional[float] = None,
                     default_layer: Optional[int] = None, title: str = "held-out probe") -> None:
    """Probe accuracy per layer (with the chance level and the default layer marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(int(x) for x in per_layer)
    acc = [per_layer[x] if x in per_layer else per_layer[str(x)] for x in layers]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(layers, acc, marker="o", ms=3)
    if chance is not None:
        ax.axhline(chance, color="0.5", ls="--", lw=1, label=f"chance ({chance:.3f})")
    if default_layer is not None:
        ax.axvline(default_layer, color="tab:red", ls=":", lw=1,
                   label=f"default layer {default_layer}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower right")
    save_png(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------ report
def machine_info() -> dict:
    import importlib.metadata as md

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass

    def version(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": version("transformers"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def report(model, tokenizer, bank: ConceptBank, corpus: Optional[Corpus] = None,
           eight: Sequence[str] = EIGHT, plots_dir: Optional[str] = None) -> dict:
    """Every figure of the concept analysis at the bank's default layer (see module docs)."""
    corpus = load_corpus(None) if corpus is None else corpus
    layer = bank.default_layer
    out: dict = {"layer": layer, "n_layers": len(bank.layers), "K": bank.K,
                 "method": bank.metadata.get("method")}
    out["valence_arousal"] = valence_arousal(bank, layer)
    eight = [n for n in eight if n in bank.names and n in corpus.texts]
    t = time.perf_counter()
    means, labels = heldout_means(model, tokenizer, bank, corpus)
    out["heldout_seconds"] = time.perf_counter() - t
    probe8 = probe_accuracy(bank, means, labels, eight)
    probe_all = probe_accuracy(bank, means, labels)
    out["probe_eight"] = {"names": eight, "n": probe8["n"], "chance": probe8["chance"],
                          "accuracy": probe8["per_layer"][layer],
                          "per_layer": probe8["per_layer"],
                          "confusion": probe8["confusion"][layer]}
    out["probe_all"] = {"n": probe_all["n"], "chance": probe_all["chance"],
                        "accuracy": probe_all["per_layer"][layer],
                        "per_layer": probe_all["per_layer"]}
    if "afraid" in bank.names and corpus.series.get("rising_danger"):
        out["rising_danger"] = series_tracking(model, tokenizer, bank,
                                               corpus.series["rising_danger"], "afraid", layer)
    if plots_dir:
        os.makedirs(plots_dir, exist_ok=True)
        plot_circumplex(bank, os.path.join(plots_dir, "concepts_circumplex.png"), layer)
        plot_probe_curve(probe8["per_layer"], os.path.join(plots_dir,
                                                            "concepts_probe_per_layer.png"),
                         probe8["chance"], layer,
                         title=f"held-out top-1 probe, {len(eight)} emotions")
        out["plots"] = ["concepts_circumplex.png", "concepts_probe_per_layer.png"]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m steerkernel.concepts.analysis",
                                description="measure the concept figures on the default model")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--plots", default=None, help="directory for the PNG plots")
    p.add_argument("--bank-out", default=None, help="also save the extracted bank here")
    args = p.parse_args(argv)
    from ..models import DEFAULT_NAME, load_model
    from .extract import extract_bank

    t0 = time.perf_counter()
    model, tok = load_model()
    t_load = time.perf_counter() - t0
    corpus = load_corpus(None)
    t0 = time.perf_counter()
    bank = extract_bank(model, tok, corpus, progress=True)
    t_extract = time.perf_counter() - t0
    if args.bank_out:
        bank.save(args.bank_out)
    res = report(model, tok, bank, corpus, plots_dir=args.plots)
    res.update({"model": DEFAULT_NAME, "corpus": corpus.source,
                "n_concepts": len(corpus.texts), "machine": machine_info(),
                "seconds": {"load_model": t_load, "extract": t_extract},
                "extraction": {k: bank.metadata.get(k) for k in ("params", "n_texts",
                                                                 "n_neutral_tokens",
                                                                 "default_layer_rule")},
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    atomic_write_bytes(args.out, (json.dumps(res, indent=1) + "\n").encode())
    print(json.dumps({k: res[k] for k in ("layer", "valence_arousal", "seconds")}, indent=1))
    print("probe (8):", res["probe_eight"]["accuracy"], " probe (all):",
          res["probe_all"]["accuracy"], " rising_danger spearman:",
          res.get("rising_danger", {}).get("spearman"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
