"""Concept extraction from residual-stream activations of any HF causal LM.

One batched forward per group of texts reads every requested decoder layer's output (site
``resid_post``) through forward hooks on the decoder layers; the forward stops after the last
requested layer (no LM head).  Texts are right-padded; a token ``t`` of a text with ``n``
tokens counts when ``t >= min(start_offset, n - 1)`` (the first tokens, which act as attention
sinks with outsized norms, are skipped; every text keeps at least its last token).

For each text ``i`` and layer ``l`` the pass keeps the mean residual over its counted tokens,
``a_{i,l} = mean_t h_{i,l,t}`` (``[N, L, d]``), the running ``sum ||h||`` over all counted
tokens, and for neutral texts the token mean ``mu_l`` and covariance ``C_l`` (``[L, d, d]``,
accumulated in float64: memory ``L * d^2 * 8`` bytes).

Methods (``u_{l,c}`` is the unnormalised vector; ``v = u / ||u||``, ``vector_norms = ||u||``):

* ``emotion`` (alias ``mean_centered``; the emotion-concept paper): ``m_c = mean_{i in c} a_i``,
  ``u_c = m_c - mean_c' m_c'``, then the top principal components of neutral tokens ``U_k``
  (fewest whose eigenvalues reach ``variance_share`` of ``trace C_l``) are projected out:
  ``u_c <- u_c - U_k U_k^T u_c``.
* ``mean_diff`` (CAA / persona vectors): ``u_c = mean_{pos} a - mean_{neg} a`` with the
  concept's negatives, or the neutral texts when it has none.
* ``pca_diff`` (RepE): paired differences ``D_j = a_{pos_j} - a_{neg_(j mod n_neg)}``; ``v`` is
  the first right singular vector of ``D`` (uncentred: the PCA of the sign-symmetrised
  differences, as RepE's random pair flips give), signed so ``mean_j D_j . v > 0``;
  ``||u|| = mean_j D_j . v``.

Statistics from the same pass: ``baseline_mean = v . mu_l``, ``baseline_std = sqrt(v^T C_l v)``
(per-token projections on neutral text), ``resid_norm[l] = mean ||h||`` over every counted
token of every text.

Default layer: among the bank layers in the middle-to-late range ``[0.4 (n-1), 0.85 (n-1)]`` of
the model's ``n`` layers, the one with the best top-1 probe accuracy on the *training* texts
(argmax over concepts of the z-scored mean projection); ties go to the layer nearest 2/3 depth.
The held-out texts (every 5th by default) are never used to choose it, so the held-out probe
accuracy reported at the default layer is an unbiased estimate.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import BankMismatchError, UnsupportedModelError
from ..introspect import decoder_layers, model_fingerprint, text_config
from .bank import ConceptBank
from .corpus import Corpus, CorpusError, load_corpus

METHODS = {"emotion": "emotion", "mean_centered": "emotion", "mean_diff": "mean_diff",
           "caa": "mean_diff", "pca_diff": "pca_diff", "repe": "pca_diff"}
DEFAULT_START_OFFSET = 2
TextLike = Union[str, Sequence[int]]


class _Stop(Exception):
    """Raised by the last hook to end a forward early (the later layers are not needed)."""


# ------------------------------------------------------------------------------ tokens
def encode(tokenizer, texts: Sequence[TextLike], max_length: int = 512) -> List[List[int]]:
    """Token ids of each text (special tokens as the tokenizer adds them, truncated to
    ``max_length``).  Without a tokenizer, ``texts`` must already be token-id lists."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if tokenizer is None:
        out = []
        for i, t in enumerate(texts):
            if isinstance(t, str) or not all(isinstance(x, int) and x >= 0 for x in t):
                raise ValueError(f"text #{i}: without a tokenizer, texts must be lists of "
                                 "non-negative token ids")
            out.append(list(t)[:max_length])
    else:
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts {bad[:5]} are not strings")
        out = [list(x) for x in tokenizer(list(texts), add_special_tokens=True, truncation=True,
                                          max_length=max_length)["input_ids"]] if texts else []
    empty = [i for i, ids in enumerate(out) if not ids]
    if empty:
        raise ValueError(f"texts {empty[:5]} have no tokens")
    return out


def counted_mask(lengths: Tensor, S: int, start_offset: int) -> Tensor:
    """``[B, S]`` bool: token ``t`` of a text of ``n`` tokens counts when
    ``min(start_offset, n - 1) <= t < n``."""
    pos = torch.arange(S, device=lengths.device)[None, :]
    first = torch.clamp(lengths - 1, max=start_offset).clamp_min(0)[:, None]
    return (pos >= first) & (pos < lengths[:, None])


def _model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_layers(model, layers: Optional[Sequence[int]]) -> List[int]:
    n = int(text_config(model).num_hidden_layers)
    if layers is None:
        return list(range(n))
    layers = sorted({int(x) for x in layers})
    bad = [x for x in layers if not 0 <= x < n]
    if bad or not layers:
        raise BankMismatchError(f"layers {bad or layers} are not decoder layers of this model "
                                f"(it has {n}: 0..{n - 1})")
    return layers


def run_batches(model, ids: List[List[int]], layers: Sequence[int],
                on_layer: Callable[[int, Tensor, Tensor, List[int]], None], *,
                start_offset: int, batch_size: int = 16, progress: bool = True,
                desc: str = "forward") -> None:
    """Forward ``ids`` in length-sorted, right-padded batches and call
    ``on_layer(pos, h [B, S, d], counted [B, S] bool, text_indices)`` with the output of
    decoder layer ``layers[pos]`` (in place of nothing: the model's output is not changed)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    blocks = decoder_layers(model)
    device = _model_device(model)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    state: Dict[str, object] = {}
    last = len(layers) - 1

    def make_hook(pos):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            on_layer(pos, h, state["mask"], state["idx"])
            if pos == last:
                raise _Stop
        return hook

    handles = [blocks[x].register_forward_hook(make_hook(p)) for p, x in enumerate(layers)]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        from tqdm.auto import tqdm

        for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            lengths = torch.tensor([len(ids[i]) for i in idx], device=device)
            S = int(lengths.max())
            inp = torch.zeros(len(idx), S, dtype=torch.long, device=device)
            for b, i in enumerate(idx):
                inp[b, :len(ids[i])] = torch.tensor(ids[i], device=device)
            attn = (torch.arange(S, device=device)[None] < lengths[:, None]).long()
            state["mask"] = counted_mask(lengths, S, start_offset)
            state["idx"] = idx
            try:
                with torch.no_grad():
                    model(input_ids=inp, attention_mask=attn, use_cache=False)
            except _Stop:
                pass
            else:
                raise UnsupportedModelError("the decoder-layer hooks never fired: cannot read "
                                            f"the residual stream of {type(model).__name__}")
    finally:
        for hd in handles:
            hd.remove()


# ------------------------------------------------------------------------------ activations
@dataclass
class Activations:
    """What one pass over ``N`` texts keeps (see the module docs).

    ``means [N, L, d]`` fp32, ``n_tokens [N]``, ``resid_norm [L]``; for the texts flagged as
    statistics texts: ``stats_mean [L, d]`` and ``stats_cov [L, d, d]`` (float64, population
    covariance over their counted tokens) and ``stats_tokens``.
    """

    layers: List[int]
    means: Tensor
    n_tokens: Tensor
    resid_norm: Tensor
    stats_mean: Optional[Tensor]
    stats_cov: Optional[Tensor]
    stats_tokens: int


def collect_activations(model, tokenizer, texts: Sequence[TextLike],
                        layers: Optional[Sequence[int]] = None, *,
                        stats: Sequence[int] = (), start_offset: int = DEFAULT_START_OFFSET,
                        batch_size: int = 16, max_length: int = 512, progress: bool = True,
                        desc: str = "activations") -> Activations:
    """Per-text mean residuals at ``layers`` for ``texts`` in one batched pass, plus token
    statistics (mean, covariance) of the texts whose indices are in ``stats``."""
    layers = _check_layers(model, layers)
    if start_offset < 0:
        raise ValueError(f"start_offset must be >= 0, got {start_offset}")
    ids = encode(tokenizer, texts, max_length)
    N, L, d = len(ids), len(layers), int(text_config(model).hidden_size)
    device = _model_device(model)
    means = torch.zeros(N, L, d)
    n_tok = torch.zeros(N, dtype=torch.long)
    norm_sum = torch.zeros(L, dtype=torch.float64, device=device)
    count = [0]
    stat_set = set(int(i) for i in stats)
    s1 = torch.zeros(L, d, dtype=torch.float64, device=device) if stat_set else None
    s2 = torch.zeros(L, d, d, dtype=torch.float64, device=device) if stat_set else None
    n_stat = [0]

    def on_layer(pos, h, mask, idx):
        if h.shape[-1] != d:
            raise UnsupportedModelError(f"decoder layer output has size {h.shape[-1]}, "
                                        f"expected hidden size {d}")
        h = h.float()
        m = mask.to(h.dtype)[..., None]
        cnt = mask.sum(1)
        means[idx, pos] = ((h * m).sum(1) / cnt[:, None]).cpu()
        norm_sum[pos] += (h.norm(dim=-1) * mask).sum().double()
        if pos == 0:
            n_tok[idx] = cnt.cpu()
            count[0] += int(cnt.sum())
        if s1 is not None:
            rows = torch.tensor([i in stat_set for i in idx], device=mask.device)
            sel = mask & rows[:, None]
            if sel.any():
                X = h[sel].double()
                s1[pos] += X.sum(0)
                s2[pos] += X.T @ X
                if pos == 0:
                    n_stat[0] += X.shape[0]

    run_batches(model, ids, layers, on_layer, start_offset=start_offset,
                batch_size=batch_size, progress=progress, desc=desc)
    mu = cov = None
    if s1 is not None and n_stat[0] > 0:
        mu = (s1 / n_stat[0]).cpu()
        cov = (s2 / n_stat[0]).cpu() - mu[:, :, None] * mu[:, None, :]
    return Activations(layers, means, n_tok, (norm_sum / max(count[0], 1)).float().cpu(),
                       mu, cov, n_stat[0])


# ------------------------------------------------------------------------------ directions
def neutral_components(cov: Tensor, share: float) -> List[Tensor]:
    """Per layer, the top eigenvectors ``U_k [d, k]`` of ``cov [L, d, d]``: the fewest whose
    eigenvalues sum to at least ``share`` of the trace (``share = 0`` keeps none)."""
    out = []
    for C in cov:
        evals, evecs = torch.linalg.eigh(C.double())
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        total = float(evals.sum())
        if share <= 0 or total <= 0:
            out.append(evecs[:, :0])
            continue
        k = int(torch.searchsorted(evals.cumsum(0) / total,
                                   torch.tensor(share, dtype=torch.float64))) + 1
        out.append(evecs[:, :min(k, C.shape[0])])
    return out


def _group_mean(means: Tensor, groups: List[List[int]]) -> Tensor:
    """``[L, G, d]`` float64: the mean of ``means[idx]`` for each index list."""
    return torch.stack([means[g].double().mean(0) for g in groups], 1)


def directions_from(acts: Activations, method: str, pos: List[List[int]],
                    neg: Optional[List[List[int]]] = None, variance_share: float = 0.5):
    """``(u [L, K, d] float64, info)`` for ``method`` from per-text means; ``pos[c]`` /
    ``neg[c]`` index the texts of concept ``c`` (see the module docs for the math)."""
    M = acts.means
    info: dict = {}
    if method == "emotion":
        if len(pos) < 2:
            raise CorpusError("the emotion method subtracts the mean over concepts: it needs at "
                              "least 2 concepts (use mean_diff for one)")
        m = _group_mean(M, pos)
        u = m - m.mean(1, keepdim=True)
        if acts.stats_cov is None:
            raise CorpusError("the emotion method needs neutral texts")
        comps = neutral_components(acts.stats_cov, variance_share)
        info["neutral_pcs_removed"] = {str(x): int(U.shape[1]) for x, U in zip(acts.layers, comps)}
        u = torch.stack([u[i] - (u[i] @ U) @ U.T for i, U in enumerate(comps)])
    elif method == "mean_diff":
        u = _group_mean(M, pos) - _group_mean(M, neg)
    elif method == "pca_diff":
        cols = []
        for p, n in zip(pos, neg):
            D = M[p].double() - M[[n[j % len(n)] for j in range(len(p))]].double()  # [n, L, d]
            per_layer = []
            for i in range(D.shape[1]):
                Dl = D[:, i]
                v = torch.linalg.svd(Dl, full_matrices=False).Vh[0]
                proj = float((Dl @ v).mean())
                per_layer.append(v * proj)  # sign-aligned, norm = mean projected difference
            cols.append(torch.stack(per_layer))
        u = torch.stack(cols, 1)
    else:
        raise ValueError(f"unknown extraction method {method!r} (choose from "
                         f"{', '.join(sorted(METHODS))})")
    return u, info


def normalise(u: Tensor, names: Sequence[str], layers: Sequence[int]):
    """``(v [L, K, d] fp32 unit rows, norms [L, K] fp32)``; a zero vector is an error."""
    norms = u.norm(dim=-1)
    zero = norms <= 1e-12 * (1 + norms.max())
    if zero.any():
        i, k = zero.nonzero()[0].tolist()
        raise CorpusError(f"concept {names[k]!r} has a zero vector at layer {layers[i]} (its "
                          "texts are indistinguishable from the reference texts there)")
    return (u / norms[..., None]).float(), norms.float()


def baseline_stats(V: Tensor, mu: Tensor, cov: Tensor):
    """``(mean [L, K], std [L, K])`` of ``v . h`` for tokens with mean ``mu [L, d]`` and
    covariance ``cov [L, d, d]``: ``v . mu`` and ``sqrt(v^T cov v)``."""
    Vd = V.double()
    mean = torch.einsum("lkd,ld->lk", Vd, mu.double())
    var = torch.einsum("lkd,lde,lke->lk", Vd, cov.double(), Vd)
    return mean.float(), var.clamp_min(0).sqrt().float()


def probe_accuracy_from_means(V: Tensor, mean: Tensor, std: Tensor, means: Tensor,
                              labels: Sequence[int]) -> Tensor:
    """Top-1 accuracy per layer ``[L]``: text ``i`` (mean residual ``means[i] [L, d]``) is
    assigned ``argmax_k z_k``, ``z = (V_l . means[i, l] - mean_l) / std_l``."""
    if len(labels) == 0:
        return torch.full((V.shape[0],), math.nan)
    p = torch.einsum("nld,lkd->nlk", means.float(), V.float())
    z = (p - mean) / std.clamp_min(1e-12)
    pred = z.argmax(-1)  # [N, L]
    return (pred == torch.as_tensor(list(labels))[:, None]).float().mean(0)


def choose_default_layer(layers: Sequence[int], n_layers: int,
                         accuracy: Optional[Sequence[float]] = None) -> int:
    """The bank layer in ``[0.4 (n-1), 0.85 (n-1)]`` (all bank layers if none is) with the
    best ``accuracy`` (when given); ties, or no accuracy, go to the one nearest 2/3 depth."""
    lo, hi, target = 0.4 * (n_layers - 1), 0.85 * (n_layers - 1), 2 * (n_layers - 1) / 3
    cand = [i for i, x in enumerate(layers) if lo <= x <= hi] or list(range(len(layers)))

    def key(i):
        acc = accuracy[i] if accuracy is not None and not math.isnan(accuracy[i]) else 0.0
        return (-round(acc, 6), abs(layers[i] - target), layers[i])

    return int(layers[min(cand, key=key)])


# ------------------------------------------------------------------------------ extraction
class _Table:
    """Distinct texts in first-seen order (each is forwarded once)."""

    def __init__(self):
        self.texts: List[TextLike] = []
        self._pos: Dict[object, int] = {}

    def add(self, texts: Sequence[TextLike]) -> List[int]:
        out = []
        for t in texts:
            key = t if isinstance(t, str) else tuple(t)
            if key not in self._pos:
                self._pos[key] = len(self.texts)
                self.texts.append(t)
            out.append(self._pos[key])
        return out


def _resolve_model(model, tokenizer):
    if model is None:
        if tokenizer is not None:
            raise ValueError("a tokenizer was given without its model")
        from ..models import load_model

        return load_model()
    return model, tokenizer


def extract_bank(model=None, tokenizer=None, corpus: Union[Corpus, str, None] = None, *,
                 method: str = "emotion", layers: Optional[Sequence[int]] = None,
                 names: Optional[Sequence[str]] = None,
                 start_offset: int = DEFAULT_START_OFFSET, batch_size: int = 16,
                 max_length: int = 512, variance_share: float = 0.5, holdout_every: int = 5,
                 progress: bool = True) -> ConceptBank:
    """Extract a :class:`ConceptBank` from ``model`` on ``corpus`` (see the module docs).

    Args:
        model, tokenizer: an HF causal LM and its tokenizer; None = the embedded default.
            With ``tokenizer=None`` the corpus texts are lists of token ids.
        corpus: a :class:`Corpus`, a path (JSON / JSONL), or None / "builtin".
        method: "emotion" (alias "mean_centered"), "mean_diff" (alias "caa") or "pca_diff"
            (alias "repe").
        layers: decoder layers to extract (default: all).
        names: restrict to these concepts of the corpus.
        start_offset: skip the first tokens of every text (see :func:`counted_mask`).
        variance_share: share of neutral variance whose principal components are projected
            out (emotion method).
        holdout_every: every n-th text of each concept is held out of the directions and
            used for the held-out probe (0 = use every text).
    """
    if method not in METHODS:
        raise ValueError(f"unknown extraction method {method!r} (choose from "
                         f"{', '.join(sorted(METHODS))})")
    method = METHODS[method]
    if not 0 <= variance_share < 1:
        raise ValueError(f"variance_share must be in [0, 1), got {variance_share}")
    model, tokenizer = _resolve_model(model, tokenizer)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(None if corpus is None else os.fspath(corpus))
    if names is not None:
        corpus = corpus.subset(list(names))
    if not corpus.neutral:
        raise CorpusError(f"corpus {corpus.source} has no neutral texts: they give the "
                          "baseline statistics (and the neutral components for 'emotion')")
    layers = _check_layers(model, layers)
    train, held = corpus.split(holdout_every)
    cnames = train.names
    table = _Table()
    pos = [table.add(train.texts[c]) for c in cnames]
    neutral = table.add(corpus.neutral)
    neg = [table.add(train.negatives[c]) if train.negatives.get(c) else neutral for c in cnames]
    held_idx = [table.add(held[c]) for c in cnames]

    acts = collect_activations(model, tokenizer, table.texts, layers, stats=neutral,
                               start_offset=start_offset, batch_size=batch_size,
                               max_length=max_length, progress=progress,
                               desc=f"extract {method}")
    u, info = directions_from(acts, method, pos, neg, variance_share)
    V, norms = normalise(u, cnames, layers)
    mean, std = baseline_stats(V, acts.stats_mean, acts.stats_cov)

    def probe(groups):
        idx = [i for g in groups for i in g]
        labels = [k for k, g in enumerate(groups) for _ in g]
        return probe_accuracy_from_means(V, mean, std, acts.means[idx], labels)

    train_acc = probe(pos) if len(cnames) > 1 else None
    held_acc = probe(held_idx) if len(cnames) > 1 and any(held_idx) else None
    n_layers = int(text_config(model).num_hidden_layers)
    default = choose_default_layer(layers, n_layers,
                                   None if train_acc is None else train_acc.tolist())
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    concepts = {c: dict(corpus.extras.get(c, {}), n_train=len(train.texts[c]),
                        n_heldout=len(held[c])) for c in cnames}
    metadata = {
        "method": method,
        "params": {"start_offset": start_offset, "add_special_tokens": True,
                   "max_length": max_length, "holdout_every": holdout_every,
                   **({"variance_share": variance_share} if method == "emotion" else {})},
        "corpus": corpus.source,
        "ratings_source": corpus.ratings_source,
        "model_dtype": dtype,
        "n_texts": len(table.texts),
        "n_neutral_tokens": acts.stats_tokens,
        "default_layer_rule": "best training-text probe accuracy within 0.4-0.85 depth, "
                              "ties to 2/3 depth",
        "probe": {
            "train_accuracy": None if train_acc is None else
            {str(x): round(float(a), 6) for x, a in zip(layers, train_acc)},
            "heldout_accuracy": None if held_acc is None else
            {str(x): round(float(a), 6) for x, a in zip(layers, held_acc)},
            "n_heldout": sum(len(g) for g in held_idx),
        },
        "concepts": concepts,
        **info,
    }
    return ConceptBank(names=cnames, layers=layers, directions=V, baseline_mean=mean,
                       baseline_std=std, vector_norms=norms, resid_norm=acts.resid_norm,
                       default_layer=default, site="resid_post", metadata=metadata,
                       fingerprint=model_fingerprint(model))


def calibrate(bank: ConceptBank, model=None, tokenizer=None,
              texts: Optional[Sequence[TextLike]] = None, *,
              start_offset: Optional[int] = None, batch_size: int = 16,
              progress: bool = False) -> ConceptBank:
    """A copy of ``bank`` whose ``baseline_mean`` / ``baseline_std`` / ``resid_norm`` are
    measured on ``texts`` (default: the built-in corpus's neutral texts) with ``model``
    (default: the embedded model); fills in a bank imported from bare vectors."""
    model, tokenizer = _resolve_model(model, tokenizer)
    bank.check_fits(model)
    if texts is None:
        texts = load_corpus(None).neutral
    if not texts:
        raise CorpusError("calibrate needs at least one text")
    offset = _bank_offset(bank) if start_offset is None else start_offset
    acts = collect_activations(model, tokenizer, list(texts), bank.layers,
                               stats=range(len(texts)), start_offset=offset,
                               batch_size=batch_size, progress=progress, desc="calibrate")
    mean, std = baseline_stats(bank.directions, acts.stats_mean, acts.stats_cov)
    meta = dict(bank.metadata, calibrated={"texts": len(texts), "tokens": acts.stats_tokens,
                                           "start_offset": offset})
    if not bank.fingerprint.get("weight_hash"):
        fp = model_fingerprint(model)
    else:
        fp = bank.fingerprint
    return bank._replace(baseline_mean=mean, baseline_std=std, resid_norm=acts.resid_norm,
                         metadata=meta, fingerprint=fp)


# ------------------------------------------------------------------------------ scoring
def _bank_offset(bank: ConceptBank) -> int:
    params = bank.metadata.get("params")
    off = params.get("start_offset") if isinstance(params, dict) else None
    return int(off) if isinstance(off, int) and off >= 0 else DEFAULT_START_OFFSET


def score_texts(model, tokenizer, bank: ConceptBank, texts: Sequence[TextLike],
                layer: Optional[int] = None, *, batch_size: int = 16, max_length: int = 512,
                progress: bool = False, backend: Optional[str] = None):
    """Mean projection of each text on every concept at ``layer`` (default: the bank's).

    The residual rows of each text's counted tokens (same offset convention as extraction)
    go through the monitor-only junction op, ``scores[t] = V h_t``; the text's score is the
    mean over its rows.  Returns ``(scores [N, K], z [N, K])`` fp32, ``z`` against the bank's
    baseline at that layer.
    """
    from ..ops import junction

    model, tokenizer = _resolve_model(model, tokenizer)
    bank.check_fits(model)
    li = bank.layer_index(layer)
    layer = bank.layers[li]
    ids = encode(tokenizer, texts, max_length)
    device = _model_device(model)
    V = bank.directions[li].to(device).contiguous()
    out = torch.zeros(len(ids), bank.K)

    def on_layer(pos, h, mask, idx):
        for b, i in enumerate(idx):
            rows = h[b][mask[b]].float().contiguous()  # [T_i, d], a copy
            scores, _, _ = junction(rows, V, backend=backend)
            out[i] = scores.mean(0).cpu()

    run_batches(model, ids, [layer], on_layer, start_offset=_bank_offset(bank),
                batch_size=batch_size, progress=progress, desc="score")
    return out, bank.z(out, layer)
