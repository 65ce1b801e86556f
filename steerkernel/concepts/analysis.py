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
* :func:`space_by_layer` -- the same at EVERY layer with 95 % bootstrap intervals over
  concepts (PC1 oriented towards valence, PC2 towards arousal), plus the best linear valence /
  arousal axis: a leave-one-out ridge readout of the rating from the top PCs, its held-out r
  with an interval, and its cosine with PC1.
* :func:`plot_circumplex`, :func:`plot_probe_curve`, :func:`plot_space_by_layer` -- PNG plots
  (matplotlib, Agg backend).

``python -m steerkernel.concepts.analysis --out FILE.json [--plots DIR]`` extracts the default
bank on the default model and writes every figure with the machine it was measured on.
"""
from __future__ import annotations

import contextlib
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


# ------------------------------------------------------------------------------ space per layer
#: ridge penalties tried by the inner leave-one-out, as multiples of the mean retained
#: eigenvalue of the (fold's) centred Gram matrix -- i.e. relative to the features' scale
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: most principal components used as features of the linear valence / arousal readout
MAX_AXIS_PCS = 20
#: |r(PC1, valence)| a layer has to reach for ``reaches_0.6``
R_TARGET = 0.6
#: rating shuffles behind the permutation p-values of :func:`space_by_layer`
N_PERM = 200


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def _ci(d: dict) -> dict:
    """A :func:`~steerkernel.stats.bootstrap_ci` dict with NaN turned into None."""
    return {"value": _finite(d["value"]), "lo": _finite(d["lo"]), "hi": _finite(d["hi"]),
            "n": int(d["n"])}


@contextlib.contextmanager
def _one_thread():
    """Run torch's linear algebra on one thread, then restore the thread count.  The matrices
    here are tiny (``[K, K]``); on a busy machine, threaded LAPACK on them is up to 100x
    slower than one thread (measured: 99 x 99 eigh, 1 ms on one thread, 0.1-0.4 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gram_pca(G: Tensor, q_max: int):
    """PCA from a Gram matrix ``G [n, n]`` (``G_ij = x_i . x_j``, float64) of n points.

    With ``C = I - 11^T / n`` the centred Gram is ``Gc = C G C = Xc Xc^T``; its eigenpairs
    ``(s_j^2, u_j)`` (descending) give the PC scores ``Z = U S`` ``[n, q]`` (the centred points
    on the principal axes ``p_j = Xc^T u_j / s_j``).  Keeps the ``q <= q_max`` components with
    ``s_j^2 > 1e-10 * s_1^2``.  Returns ``(Z [n, q], U [n, q], s [q])``.
    """
    n = G.shape[0]
    C = torch.eye(n, dtype=G.dtype) - 1.0 / n
    Gc = C @ G @ C
    ev, U = torch.linalg.eigh((Gc + Gc.T) / 2)
    ev, U = ev.flip(-1), U.flip(-1)
    q = min(int((ev > max(float(ev[0]), 0.0) * 1e-10).sum()), q_max)
    s, U = ev[:q].sqrt(), U[:, :q].contiguous()
    return U * s, U, s


def _ridge_press(U: Tensor, s: Tensor, Y: Tensor, grid: Sequence[float]):
    """Ridge on PC scores ``Z = U S`` ``[n, q]`` (centred, orthogonal columns) with an
    unpenalised intercept, for each column of ``Y [n, P]`` (P rating vectors at once).

    For each ``alpha = a * mean(s^2)`` of the grid: ``w = diag(s / (s^2 + alpha)) U^T Yc``
    (``Yc`` = ``Y`` centred per column), hat matrix
    ``H = 11^T / n + U diag(s^2 / (s^2 + alpha)) U^T`` and the exact leave-one-out
    (PRESS) error ``sum_i (Yc - H Yc)_i^2 / (1 - H_ii)^2``.  Returns ``(alpha [P], w [q, P])``
    at the smallest PRESS of each column (the first grid value on ties; weights on the
    scores).  ``q = 0`` (all points identical): NaN alphas, empty weights.
    """
    n, P = Y.shape
    if s.numel() == 0:
        return torch.full((P,), math.nan, dtype=Y.dtype), Y.new_zeros(0, P)
    Yc = Y - Y.mean(0)
    UY = U.T @ Yc                                                      # [q, P]
    s2 = s ** 2
    alphas = torch.tensor(list(grid), dtype=Y.dtype) * s2.mean()       # [A]
    shrink = s2 / (s2 + alphas[:, None])                               # [A, q]
    h = 1.0 / n + shrink @ (U ** 2).T                                  # [A, n]
    fit = torch.einsum("nq,aq,qp->anp", U, shrink, UY)                 # [A, n, P]
    press = (((Yc - fit) / (1 - h).clamp_min(1e-12)[:, :, None]) ** 2).sum(1)   # [A, P]
    alpha = alphas[press.argmin(0)]                                    # [P]
    return alpha, s[:, None] / (s2[:, None] + alpha) * UY


def _loo_folds(G: Tensor, q_max: int) -> list:
    """Leave-one-out folds from the Gram matrix ``G [n, n]``: for each ``i``, the other points
    ``T [n-1]``, their PCA ``(U [n-1, q], s [q])`` (as :func:`_gram_pca`, ``q <= q_max``; all
    folds in one batched eigh) and the held-out point's PC scores ``z_i [q]``: with
    ``g = G[i, T]`` and ``m`` the fold's mean,
    ``(x_i - m) . p_j = (g - mean g - mean_rows G_TT + mean G_TT) . u_j / s_j``."""
    n = G.shape[0]
    T = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, n)]) for i in range(n)])
    GT = G[T[:, :, None], T[:, None, :]]                               # [n, n-1, n-1]
    C = torch.eye(n - 1, dtype=G.dtype) - 1.0 / (n - 1)
    Gc = C @ GT @ C
    ev, U = torch.linalg.eigh((Gc + Gc.mT) / 2)
    ev, U = ev.flip(-1), U.flip(-1)
    g = G[torch.arange(n)[:, None], T]                                 # [n, n-1]
    gc = g - g.mean(1, keepdim=True) - GT.mean(1) + GT.mean((1, 2))[:, None]
    folds = []
    for i in range(n):
        q = min(int((ev[i] > max(float(ev[i, 0]), 0.0) * 1e-10).sum()), q_max)
        s, Ui = ev[i, :q].sqrt(), U[i, :, :q]
        folds.append((T[i], Ui, s, gc[i] @ Ui / s))
    return folds


def _loo_axis_scores(folds: list, Y: Tensor, grid: Sequence[float]) -> Tensor:
    """Held-out axis coordinates ``t [n, P]`` for each column of ``Y [n, P]``: in fold ``i``
    the ridge (:func:`_ridge_press`, alpha by inner LOO) is fitted on the other points only,
    and ``t_i = (x_i - m_{-i}) . a_{-i} = z_i . w_{-i} / ||w_{-i}||`` is the held-out point's
    coordinate on the fold's unit axis ``a_{-i} = P_{-i} w_{-i} / ||w_{-i}||`` (``P_{-i}`` the
    fold's principal axes, orthonormal; ``m_{-i}`` its mean)."""
    t = Y.new_zeros(len(folds), Y.shape[1])
    for i, (T, U, s, z) in enumerate(folds):
        _, w = _ridge_press(U, s, Y[T], grid)
        norm = w.norm(dim=0)
        t[i] = torch.where(norm > 0, (z @ w) / norm.clamp_min(1e-300), 0.0)
    return t


def _columns_r(X: Tensor, Y: Tensor) -> Tensor:
    """Pearson r of matching columns of ``X [n, P]`` and ``Y [n, P]`` (NaN if constant)."""
    a, b = X - X.mean(0), Y - Y.mean(0)
    den = ((a * a).sum(0) * (b * b).sum(0)).sqrt()
    return torch.where(den > 0, (a * b).sum(0) / den.clamp_min(1e-300), math.nan)


def _perm_p(observed: float, null: Tensor, two_sided: bool) -> Optional[float]:
    """``(1 + #{null >= observed}) / (1 + #null)`` (on ``|r|`` when ``two_sided``)."""
    null = null[torch.isfinite(null)]
    if not math.isfinite(observed) or null.numel() == 0:
        return None
    if two_sided:
        null, observed = null.abs(), abs(observed)
    return (1 + int((null >= observed - 1e-12).sum())) / (1 + null.numel())


def _space_layer(bank: ConceptBank, li: int, idx: List[int], y: Dict[str, Tensor],
                 Y: Dict[str, Tensor], q_max: int, grid: Sequence[float], ci) -> dict:
    """One layer's row of :func:`space_by_layer` (see there): ``idx`` the rated concepts,
    ``y[key] [K]`` the ratings, ``Y[key] [K, 1 + n_perm]`` the ratings then their shuffles,
    ``ci(x, y)`` the bootstrap interval of ``r(x, y)``."""
    K, n_perm = len(idx), Y["valence"].shape[1] - 1
    X = bank.directions[li, idx].double()                                  # [K, d]
    G = X @ X.T                                                            # [K, K]
    Z, U, s = _gram_pca(G, K - 1)
    total = float((s ** 2).sum())
    explained = [float(v) / total if total > 0 else math.nan for v in s ** 2]
    # orient: PC1 towards valence, PC2 towards arousal
    for j, key in ((0, "valence"), (1, "arousal")):
        if Z.shape[1] > j and pearson(Z[:, j], y[key]) < 0:
            Z[:, j] *= -1
            U[:, j] *= -1
    row: dict = {"layer": int(bank.layers[li]),
                 "explained_pc1": _finite(explained[0]) if explained else None,
                 "explained_pc2": _finite(explained[1]) if len(explained) > 1 else None}
    for pc in (1, 2):
        for key in ("valence", "arousal"):
            if Z.shape[1] < pc:
                row[f"r_pc{pc}_{key}"] = {"value": None, "lo": None, "hi": None, "n": K}
                continue
            c = row[f"r_pc{pc}_{key}"] = ci(Z[:, pc - 1], y[key])
            if (pc, key) in ((1, "valence"), (2, "arousal")):
                null = _columns_r(Z[:, pc - 1:pc].expand(K, n_perm), Y[key][:, 1:])
                c["p_perm"] = None if c["value"] is None else _perm_p(c["value"], null, True)
    folds = _loo_folds(G, q_max)
    q = min(q_max, U.shape[1])
    for key in ("valence", "arousal"):
        t = _loo_axis_scores(folds, Y[key], grid)                         # [K, 1 + n_perm]
        rs = _columns_r(t, Y[key])
        alpha, w = _ridge_press(U[:, :q], s[:q], y[key][:, None], grid)
        w = w[:, 0]
        wn = float(w.norm())
        null = rs[1:][torch.isfinite(rs[1:])]
        row[f"{key}_axis"] = {
            "r": ci(t[:, 0], y[key]),
            "p_perm": _perm_p(float(rs[0]), rs[1:], two_sided=False),
            "null_r_95": _finite(torch.quantile(null, 0.95)) if null.numel() else None,
            "alpha": _finite(alpha[0]), "n_pcs": int(q),
            "cos_pc1": _finite(w[0] / wn) if wn > 0 and q >= 1 else None,
            "cos_pc2": _finite(w[1] / wn) if wn > 0 and q >= 2 else None}
    return row


def space_by_layer(bank: ConceptBank, names: Optional[Sequence[str]] = None,
                   n_boot: Optional[int] = None, seed: int = 0, *,
                   n_perm: int = N_PERM, max_pcs: int = MAX_AXIS_PCS,
                   ridge_grid: Sequence[float] = RIDGE_GRID) -> dict:
    """Geometry of the concept space at EVERY bank layer, against valence / arousal ratings.

    Concepts: ``names`` (default: all of the bank's) that have both a numeric ``valence`` and
    ``arousal`` in ``bank.metadata["concepts"][name]`` (see :func:`ratings`); the others are
    left out and listed under ``"excluded"``.  Fewer than 5 rated concepts: ValueError.  With
    ``X_l [K, d]`` the K rated unit directions at layer ``l`` and ``y [K]`` a rating:

    * **PCA** of ``Xc = X_l - mean_k X_l`` (centred over concepts; computed from the Gram
      matrix ``Xc Xc^T [K, K]``, so the cost does not grow with d beyond one ``[K, d]``
      product): singular values ``s_j``, ``explained_pcJ = s_J^2 / sum_j s_j^2``, coordinates
      ``z_J = Xc p_J [K]``.  A PC's sign is arbitrary: PC1 is oriented so that
      ``r(PC1, valence) >= 0`` and PC2 so that ``r(PC2, arousal) >= 0``; ``r_pc1_arousal`` and
      ``r_pc2_valence`` are reported with those orientations.
    * **Intervals**: each ``r_pcJ_KEY`` is Pearson ``r(z_J, y)`` with a percentile bootstrap
      interval (:func:`steerkernel.stats.correlation_ci`, ``n_boot`` resamples, 95 %) that
      resamples *concepts* as (coordinate, rating) pairs on the fixed coordinates: the PCA is
      NOT redone per resample, so the interval covers the sampling of concepts given this PC
      axis, not the uncertainty of the axis itself nor its sign (chosen on the full sample,
      which makes the oriented r an ``|r|``: biased upwards when there is no relation).
      ``r_pc1_valence`` and ``r_pc2_arousal`` also carry ``p_perm``: the permutation p-value
      of ``|r|`` (ratings shuffled ``n_perm`` times over the fixed coordinates), which does
      account for the orientation.
    * **Best linear axis** (``valence_axis``, ``arousal_axis``): a ridge readout
      ``y ~ b + Z w`` of the rating from the concepts' coordinates ``Z [K, q]`` on the top
      ``q = min(K - 1, max_pcs)`` PCs, assessed by leave-one-out: for each concept i, the PCA,
      the ridge penalty (``alpha = a * mean eigenvalue``, ``a`` in ``ridge_grid`` chosen by
      the exact inner LOO / PRESS) and the weights are fitted on the other K - 1 concepts only,
      and ``t_i = (x_i - m_{-i}) . a_{-i}`` is the held-out concept's coordinate on that fold's
      *unit* axis ``a_{-i} = P_{-i} w_{-i} / ||w_{-i}||`` (centred on the fold's mean).
      Neither the fold's intercept nor its weight scale enters ``t``: the LOO means
      ``mean(y_{-i})`` are anti-correlated with ``y_i``, and the penalty chosen per fold
      changes the scale of raw predictions from fold to fold; either biases the pooled r
      downwards (about -0.2 on random directions with K = 16), the unit-axis coordinate does
      not (about 0).  ``r`` is Pearson ``r(t, y)`` with a bootstrap interval over concepts on
      the held-out pairs ``(t_i, y_i)``.  That interval treats the K held-out pairs as
      independent, which they are not (each fold shares K - 2 concepts with the others), so it
      is too narrow: on random directions it excludes 0 far more often than 5 % of the time.
      ``p_perm`` (one-sided, ``r >= observed``; the whole LOO rerun on ``n_perm`` shuffles of
      the ratings) and ``null_r_95`` (the 95th percentile of those shuffled r, i.e. the chance
      level) are the test to use.  ``alpha`` / ``n_pcs`` / ``cos_pc1`` / ``cos_pc2`` describe
      the axis fitted on all K concepts: ``a = P w / ||P w||`` in the residual space
      (``P [d, q]`` the principal axes) and its cosine with the oriented PC1 / PC2
      (``w_1 / ||w||``, ``w_2 / ||w||``).

    Args:
        bank: the concept bank; every layer of ``bank.layers`` is analysed.
        names: concepts to use (default: all); unknown names raise UnknownConceptError.
        n_boot: bootstrap resamples per interval (default
            :data:`steerkernel.stats.N_BOOT`).
        seed: seed of every interval's resampling (the same resamples for every statistic)
            and of the permutations (the same shuffles at every layer).
        n_perm: rating shuffles for the permutation p-values (0: none, p_perm is None).
        max_pcs: most PCs used as readout features.
        ridge_grid: relative ridge penalties tried by the inner leave-one-out.

    Returns:
        ``{"names" [K] (rated, used), "excluded" [..] (no ratings), "n_concepts": K,
        "n_boot", "n_perm", "seed", "level", "default_layer", "layers": [per layer: {"layer",
        "explained_pc1", "explained_pc2", "r_pc1_valence", "r_pc1_arousal", "r_pc2_valence",
        "r_pc2_arousal" (each ``{"value", "lo", "hi", "n"}``, the first and last with
        ``"p_perm"``), "valence_axis", "arousal_axis" (each ``{"r": {"value", "lo", "hi",
        "n"}, "p_perm", "null_r_95", "alpha", "n_pcs", "cos_pc1", "cos_pc2"}``)}],
        "best_layer_pc1_valence": the layer with the largest |r(PC1, valence)|,
        "best_layer_valence_axis": the layer with the largest held-out valence-axis r,
        "reaches_0.6": any layer with |r(PC1, valence)| >= 0.6 (point estimate),
        "reaches_0.6_ci_lo": any layer whose interval's lower end is >= 0.6}``.  Statistics
        that are undefined (a constant rating or coordinate) are None.
    """
    import numpy as np

    from ..stats import LEVEL, N_BOOT, correlation_ci

    n_boot = N_BOOT if n_boot is None else int(n_boot)
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    if int(n_perm) < 0:
        raise ValueError(f"n_perm must be >= 0, got {n_perm}")
    names = _names(bank, names)
    rated = [n for n in names
             if ratings(bank, "valence", [n]) is not None
             and ratings(bank, "arousal", [n]) is not None]
    excluded = [n for n in names if n not in rated]
    if len(rated) < 5:
        raise ValueError(
            f"concept space analysis needs at least 5 concepts with numeric valence and arousal "
            f"ratings in bank.metadata['concepts'] (found {len(rated)} of {len(names)}"
            + (f"; without ratings: {', '.join(excluded[:10])}"
               + (" ..." if len(excluded) > 10 else "") if excluded else "") + ")")
    K = len(rated)
    keys = ("valence", "arousal")
    y = {key: torch.tensor(ratings(bank, key, rated), dtype=torch.float64) for key in keys}
    n_perm = int(n_perm)
    perm = torch.from_numpy(np.random.default_rng(seed).permuted(
        np.tile(np.arange(K), (n_perm, 1)), axis=1))                       # [n_perm, K]
    # column 0: the ratings, columns 1..n_perm: shuffles
    Y = {key: torch.cat([y[key][:, None], y[key][perm].T], dim=1) for key in keys}
    idx = [bank.concept_index(n) for n in rated]
    q_max = min(K - 1, int(max_pcs))

    def ci(x: Tensor, yy: Tensor) -> dict:
        return _ci(correlation_ci(x.numpy(), yy.numpy(), n_boot=n_boot, seed=seed))

    per_layer = []
    with _one_thread():
        for li, layer in enumerate(bank.layers):
            per_layer.append(_space_layer(bank, li, idx, y, Y, q_max, ridge_grid, ci))

    def best(get, key=abs):  # the lowest such layer on ties
        scored = [(key(v), -r["layer"]) for r in per_layer for v in [get(r)] if v is not None]
        return -max(scored)[1] if scored else None

    pc1 = [r["r_pc1_valence"] for r in per_layer]
    return {"names": rated, "excluded": excluded, "n_concepts": K, "n_boot": n_boot,
            "n_perm": int(n_perm), "seed": int(seed), "level": LEVEL,
            "default_layer": bank.default_layer, "layers": per_layer,
            "best_layer_pc1_valence": best(lambda r: r["r_pc1_valence"]["value"]),
            "best_layer_valence_axis": best(lambda r: r["valence_axis"]["r"]["value"],
                                            key=float),
            "reaches_0.6": any(c["value"] is not None and abs(c["value"]) >= R_TARGET
                               for c in pc1),
            "reaches_0.6_ci_lo": any(c["lo"] is not None and c["lo"] >= R_TARGET for c in pc1)}

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


def plot_space_by_layer(result: dict, path: str) -> None:
    """PNG of a :func:`space_by_layer` result: per layer (x axis), ``|r(PC1, valence)|``,
    ``|r(PC2, arousal)|`` (both oriented ``>= 0``, so the point is ``|r|``; the band is the
    oriented r's 95 % bootstrap interval, which may dip below 0) and the held-out (LOO)
    valence-axis r with its interval; a dashed line at 0.6 and the default layer dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    layers = [r["layer"] for r in rows]

    def series(get):
        def num(v):
            return math.nan if v is None else float(v)
        cis = [get(r) for r in rows]
        return ([num(c["value"]) for c in cis], [num(c["lo"]) for c in cis],
                [num(c["hi"]) for c in cis])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, get, colour in (
            ("|r(PC1, valence)|", lambda r: r["r_pc1_valence"], "tab:red"),
            ("|r(PC2, arousal)|", lambda r: r["r_pc2_arousal"], "tab:blue"),
            ("valence axis, held-out r (LOO ridge)", lambda r: r["valence_axis"]["r"],
             "tab:green")):
        v, lo, hi = series(get)
        ax.plot(layers, v, marker="o", ms=3, color=colour, label=label)
        ax.fill_between(layers, lo, hi, color=colour, alpha=0.15, lw=0)
    ax.axhline(R_TARGET, color="0.3", ls="--", lw=1, label=f"|r| = {R_TARGET}")
    ax.axhline(0, color="0.8", lw=0.8)
    if result.get("default_layer") in layers:
        ax.axvline(result["default_layer"], color="0.5", ls=":", lw=1,
                   label=f"default layer {result['default_layer']}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("Pearson r")
    ax.set_ylim(min(-0.2, ax.get_ylim()[0]), 1.02)
    ax.set_title(f"concept space vs ratings, {result['n_concepts']} concepts "
                 f"({int(round(100 * result.get('level', 0.95)))} % bootstrap intervals)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8,
              frameon=False)
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
    """Every figure of the concept analysis at the bank's default layer (see module docs),
    plus ``"space_by_layer"``: :func:`space_by_layer` over every layer (or ``{"error": ...}``
    when the bank has fewer than 5 rated concepts).  With ``plots_dir``, the PNGs (listed
    under ``"plots"``) include ``concepts_space_by_layer.png``."""
    corpus = load_corpus(None) if corpus is None else corpus
    layer = bank.default_layer
    out: dict = {"layer": layer, "n_layers": len(bank.layers), "K": bank.K,
                 "method": bank.metadata.get("method")}
    out["valence_arousal"] = valence_arousal(bank, layer)
    try:
        out["space_by_layer"] = space_by_layer(bank)
    except ValueError as e:  # fewer than 5 rated concepts: the rest of the report still stands
        out["space_by_layer"] = {"error": str(e)}
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
        if "layers" in out["space_by_layer"]:
            plot_space_by_layer(out["space_by_layer"],
                                os.path.join(plots_dir, "concepts_space_by_layer.png"))
            out["plots"].append("concepts_space_by_layer.png")
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
