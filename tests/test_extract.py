"""Extraction on a tiny random Llama (offline): the activation pass against plain per-text
forwards, each method against its definition, statistics, the default-layer rule, scoring
through the junction op, calibration, and corpora."""
import json
import math

import pytest
import torch

from steerkernel.concepts.corpus import (Corpus, CorpusError, corpus_from_dict,
                                         corpus_from_jsonl, load_corpus)
from steerkernel.concepts.extract import (calibrate, choose_default_layer, collect_activations,
                                          counted_mask, encode, extract_bank,
                                          probe_accuracy_from_means, score_texts)
from steerkernel.concepts.interop import bank_from_vectors
from steerkernel.errors import BankMismatchError

from fixtures_models import char_tokenizer, tiny_llama

OFFSET = 2


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def random_texts(lo, hi, n, seed, min_len=2, max_len=14):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(min_len, max_len, (1,), generator=g))
        out.append(torch.randint(lo, hi, (k,), generator=g).tolist())
    return out


@pytest.fixture(scope="module")
def corpus():
    """Three concepts drawing tokens from disjoint vocabulary ranges, neutral text from all."""
    return Corpus({"a": random_texts(4, 40, 20, 1), "b": random_texts(40, 80, 20, 2),
                   "c": random_texts(80, 128, 20, 3)},
                  neutral=random_texts(4, 128, 16, 4),
                  negatives={"b": random_texts(4, 128, 12, 5)},
                  extras={"a": {"valence": 1.0}, "b": {}, "c": {}})


_OUTPUTS = {}


def layer_outputs(model, ids):
    """Every decoder layer's output ``[L, S, d]`` for one unpadded text (plain hooks;
    memoised per model and text)."""
    key = (id(model), tuple(ids))
    if key not in _OUTPUTS:
        _OUTPUTS[key] = _layer_outputs(model, ids)
    return _OUTPUTS[key]


def _layer_outputs(model, ids):
    got = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(
        i, (o[0] if isinstance(o, tuple) else o)[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return torch.stack([got[i] for i in range(len(got))])  # [L, S, d]


def counted(h, offset=OFFSET):
    S = h.shape[1]
    return h[:, min(offset, S - 1):]  # [L, T, d]


# ------------------------------------------------------------------------------ the pass
def test_counted_mask():
    m = counted_mask(torch.tensor([1, 2, 3, 5]), 5, 2)
    assert m.tolist() == [[True, False, False, False, False],
                          [False, True, False, False, False],
                          [False, False, True, False, False],
                          [False, False, True, True, True]]
    assert counted_mask(torch.tensor([3]), 4, 0).tolist() == [[True, True, True, False]]


def test_batched_pass_matches_plain_forwards(model):
    """Right padding, masks and the early stop change nothing: per-text means, residual norm
    and the neutral statistics equal those of one-text forwards."""
    texts = random_texts(4, 128, 11, 7, min_len=1)
    stats = [1, 4, 5, 9]
    acts = collect_activations(model, None, texts, None, stats=stats, start_offset=OFFSET,
                               batch_size=4, progress=False)
    per_text = [counted(layer_outputs(model, t)) for t in texts]
    want = torch.stack([h.mean(1) for h in per_text])  # [N, L, d]
    torch.testing.assert_close(acts.means, want, atol=2e-5, rtol=1e-4)
    assert acts.n_tokens.tolist() == [h.shape[1] for h in per_text]
    norms = torch.cat([h.norm(dim=-1) for h in per_text], 1)  # [L, all tokens]
    torch.testing.assert_close(acts.resid_norm, norms.mean(1), atol=1e-5, rtol=1e-5)
    X = torch.cat([per_text[i] for i in stats], 1).double()  # [L, n, d]
    assert acts.stats_tokens == X.shape[1]
    mu = X.mean(1)
    cov = torch.einsum("lnd,lne->lde", X - mu[:, None], X - mu[:, None]) / X.shape[1]
    torch.testing.assert_close(acts.stats_mean, mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts.stats_cov, cov, atol=1e-5, rtol=1e-4)
    # a subset of layers reads the same numbers
    sub = collect_activations(model, None, texts, [1, 3], start_offset=OFFSET, batch_size=3,
                              progress=False)
    torch.testing.assert_close(sub.means, acts.means[:, [1, 3]], atol=2e-5, rtol=1e-4)
    assert sub.stats_cov is None


def test_tokenizer_path_equals_token_ids(model):
    tok = char_tokenizer()
    texts = ["I am so happy today!", "ok", "A much longer sentence, with punctuation."]
    ids = encode(tok, texts)
    assert ids[1] == [tok.convert_tokens_to_ids(c) for c in "ok"]
    a = collect_activations(model, tok, texts, [0, 2], progress=False)
    b = collect_activations(model, None, ids, [0, 2], progress=False)
    assert torch.equal(a.means, b.means)


# ------------------------------------------------------------------------------ methods
def _means(model, texts):
    return torch.stack([counted(layer_outputs(model, t)).mean(1) for t in texts]).double()


def _neutral_cov(model, texts):
    X = torch.cat([counted(layer_outputs(model, t)) for t in texts], 1).double()
    mu = X.mean(1)
    return mu, torch.einsum("lnd,lne->lde", X - mu[:, None], X - mu[:, None]) / X.shape[1]


@pytest.fixture(scope="module")
def banks(model, corpus):
    return {m: extract_bank(model, None, corpus, method=m, progress=False, batch_size=8)
            for m in ("emotion", "mean_diff", "pca_diff")}


def test_emotion_method_definition(model, corpus, banks):
    bank = banks["emotion"]
    train, held = corpus.split(5)
    m = torch.stack([_means(model, train.texts[c]).mean(0) for c in "abc"], 1)  # [L, K, d]
    u = m - m.mean(1, keepdim=True)
    _, cov = _neutral_cov(model, corpus.neutral)
    for i in range(bank.L):
        ev, evec = torch.linalg.eigh(cov[i])
        ev, evec = ev.flip(0), evec.flip(1)
        k = int((ev.cumsum(0) / ev.sum() < 0.5).sum()) + 1
        assert bank.metadata["neutral_pcs_removed"][str(i)] == k
        U = evec[:, :k]
        ui = u[i] - (u[i] @ U) @ U.T
        torch.testing.assert_close(bank.directions[i], (ui / ui.norm(dim=-1, keepdim=True)).float(),
                                   atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(bank.vector_norms[i], ui.norm(dim=-1).float(), atol=1e-4,
                                   rtol=1e-3)
        assert (bank.directions[i].double() @ U).abs().max() < 1e-4  # neutral PCs are gone
    assert bank.metadata["method"] == "emotion" and bank.metadata["concepts"]["a"] == {
        "valence": 1.0, "n_train": 16, "n_heldout": 4}


def test_mean_diff_definition(model, corpus, banks):
    bank = banks["mean_diff"]
    train, _ = corpus.split(5)
    neutral = _means(model, corpus.neutral).mean(0)
    for k, c in enumerate("abc"):
        neg = _means(model, train.negatives[c]).mean(0) if c in train.negatives else neutral
        u = _means(model, train.texts[c]).mean(0) - neg  # [L, d]
        torch.testing.assert_close(bank.directions[:, k], (u / u.norm(dim=-1, keepdim=True)).float(),
                                   atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(bank.vector_norms[:, k], u.norm(dim=-1).float(), atol=1e-4,
                                   rtol=1e-3)


def test_pca_diff_definition(model, corpus, banks):
    bank = banks["pca_diff"]
    train, _ = corpus.split(5)
    for k, c in enumerate("abc"):
        pos = _means(model, train.texts[c])
        negs = train.negatives.get(c) or corpus.neutral
        neg = _means(model, [negs[j % len(negs)] for j in range(len(pos))])
        D = pos - neg  # [n, L, d]
        for i in range(bank.L):
            v = torch.linalg.svd(D[:, i]).Vh[0]
            v = v if (D[:, i] @ v).mean() > 0 else -v
            torch.testing.assert_close(bank.directions[i, k], v.float(), atol=1e-4, rtol=1e-3)
            assert (D[:, i] @ bank.directions[i, k].double()).mean() > 0
            torch.testing.assert_close(bank.vector_norms[i, k],
                                       (D[:, i] @ v).mean().float(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("method", ["emotion", "mean_diff", "pca_diff"])
def test_statistics_are_token_projections(model, corpus, banks, method):
    """baseline mean / std: per-token projections on neutral text; resid_norm: mean token
    norm over every forwarded text."""
    bank = banks[method]
    X = torch.cat([counted(layer_outputs(model, t)) for t in corpus.neutral], 1)  # [L, n, d]
    p = torch.einsum("lnd,lkd->lkn", X, bank.directions)
    torch.testing.assert_close(bank.baseline_mean, p.mean(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bank.baseline_std, p.std(-1, unbiased=False), atol=1e-4,
                               rtol=1e-3)
    train, held = corpus.split(5)
    every = {tuple(t) for c in "abc" for t in train.texts[c] + held[c]}
    every |= {tuple(t) for t in corpus.neutral} | {tuple(t) for t in train.negatives["b"]}
    norms = torch.cat([counted(layer_outputs(model, list(t))).norm(dim=-1) for t in every], 1)
    torch.testing.assert_close(bank.resid_norm, norms.mean(1), atol=1e-4, rtol=1e-4)
    assert bank.fingerprint["hidden_size"] == 64 and bank.fingerprint["weight_hash"]
    bank.check_fits(model)


def test_deterministic_and_batch_size_invariant(model, corpus, banks):
    again = extract_bank(model, None, corpus, method="emotion", progress=False, batch_size=3)
    torch.testing.assert_close(again.directions, banks["emotion"].directions, atol=1e-5,
                               rtol=1e-4)
    torch.testing.assert_close(again.baseline_std, banks["emotion"].baseline_std, atol=1e-5,
                               rtol=1e-4)
    assert again.default_layer == banks["emotion"].default_layer


@pytest.mark.parametrize("method", ["emotion", "mean_diff", "pca_diff"])
def test_planted_concepts_are_recovered(method):
    """Plant three orthonormal directions in the embeddings of three disjoint vocabulary
    ranges (neutral text uses a fourth range): every method recovers them (cosine > 0.85 at
    every layer; for 'emotion' the target is the direction minus the mean over concepts) and
    the held-out probe (12 unseen texts) is perfect."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(11)
    planted = torch.linalg.qr(torch.randn(64, 3, generator=g)).Q.T  # [3, d] orthonormal
    ranges = [(20, 56), (56, 92), (92, 128)]
    with torch.no_grad():
        for k, (lo, hi) in enumerate(ranges):
            model.model.embed_tokens.weight[lo:hi] += planted[k]
    c = Corpus({n: random_texts(lo, hi, 20, k + 1) for k, (n, (lo, hi))
                in enumerate(zip("abc", ranges))}, neutral=random_texts(4, 20, 16, 9))
    bank = extract_bank(model, None, c, method=method, progress=False)
    target = planted - (planted.mean(0) if method == "emotion" else 0)
    target = target / target.norm(dim=-1, keepdim=True)
    cos = (bank.directions * target).sum(-1)  # [L, K]
    assert cos.min() > 0.85, cos
    assert set(bank.metadata["probe"]["heldout_accuracy"].values()) == {1.0}
    assert bank.metadata["probe"]["n_heldout"] == 12


def test_layer_subset_and_names(model, corpus):
    b = extract_bank(model, None, corpus, method="mean_diff", layers=[3, 1], names=["c", "a"],
                     progress=False, holdout_every=0)
    assert b.layers == [1, 3] and b.names == ["c", "a"]
    assert b.metadata["probe"]["heldout_accuracy"] is None


def test_default_layer_rule():
    assert choose_default_layer(list(range(30)), 30) == 19  # nearest 2/3 depth
    acc = [0.1] * 30
    acc[14], acc[25], acc[3] = 0.9, 0.95, 1.0   # 3 and 25 are outside 0.4-0.85 depth
    assert choose_default_layer(list(range(30)), 30, acc) == 14
    assert choose_default_layer([2, 3], 30) == 3  # no layer in range: all are candidates
    assert choose_default_layer(list(range(4)), 4, [0.5, 0.9, 0.9, 0.9]) == 2


def test_probe_from_means():
    V = torch.eye(3)[None]  # one layer, K = 3 axis directions in d = 3
    means = torch.tensor([[[5.0, 0, 0]], [[0, 0, 5.0]], [[0, 5.0, 0]]])
    acc = probe_accuracy_from_means(V, torch.zeros(1, 3), torch.ones(1, 3), means, [0, 2, 0])
    assert acc.tolist() == pytest.approx([2 / 3])
    # z-scoring matters: a concept with a large baseline is discounted
    acc = probe_accuracy_from_means(V, torch.tensor([[0.0, 0, 10]]), torch.ones(1, 3),
                                    torch.tensor([[[1.0, 0, 8]]]), [0])
    assert acc.tolist() == [1.0]


def test_extract_errors(model, corpus):
    with pytest.raises(ValueError, match="unknown extraction method 'ica'"):
        extract_bank(model, None, corpus, method="ica", progress=False)
    with pytest.raises(CorpusError, match="at least 2 concepts"):
        extract_bank(model, None, corpus.subset(["a"]), progress=False)
    no_neutral = Corpus({"a": corpus.texts["a"], "b": corpus.texts["b"]})
    with pytest.raises(CorpusError, match="no neutral texts"):
        extract_bank(model, None, no_neutral, method="mean_diff", progress=False)
    with pytest.raises(BankMismatchError, match=r"layers \[4\] are not decoder layers"):
        extract_bank(model, None, corpus, layers=[1, 4], progress=False)
    with pytest.raises(ValueError, match="variance_share"):
        extract_bank(model, None, corpus, variance_share=1.0, progress=False)
    with pytest.raises(ValueError, match="tokenizer was given without its model"):
        extract_bank(None, char_tokenizer(), corpus)
    with pytest.raises(ValueError, match="start_offset"):
        collect_activations(model, None, [[1, 2]], start_offset=-1, progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        collect_activations(model, None, [[1, 2], []], progress=False)
    with pytest.raises(ValueError, match="lists of non-negative token ids"):
        collect_activations(model, None, ["text without tokenizer"], progress=False)
    with pytest.raises(CorpusError, match="unknown|no concepts"):
        corpus.subset(["zzz"])


# ------------------------------------------------------------------------------ scoring
def test_score_texts_goes_through_the_junction(model, corpus, banks, monkeypatch):
    import steerkernel.ops as ops

    bank = banks["emotion"]
    calls = []
    real = ops.junction

    def spy(residual, V, *a, **k):
        calls.append((tuple(residual.shape), tuple(V.shape), k.get("backend")))
        return real(residual, V, *a, **k)

    monkeypatch.setattr(ops, "junction", spy)
    texts = corpus.texts["a"][:3] + corpus.texts["c"][:2]
    scores, z = score_texts(model, None, bank, texts, layer=1)
    assert len(calls) == len(texts) and all(c[1] == (3, 64) for c in calls)
    means = collect_activations(model, None, texts, [1], progress=False).means[:, 0]
    torch.testing.assert_close(scores, means @ bank.vectors(1).T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, bank.z(scores, 1))
    s_default, _ = score_texts(model, None, bank, texts)  # the bank's default layer
    means = collect_activations(model, None, texts, [bank.default_layer], progress=False).means
    torch.testing.assert_close(s_default, means[:, 0] @ bank.vectors().T, atol=1e-5, rtol=1e-4)
    with pytest.raises(BankMismatchError, match="layer 9 is not in the bank"):
        score_texts(model, None, bank, texts, layer=9)
    with pytest.raises(BankMismatchError, match="weight_hash"):
        score_texts(tiny_llama(seed=3), None, bank, texts)


def test_calibrate_fills_imported_vectors(model, corpus, banks):
    bank = banks["mean_diff"]
    bare = bank_from_vectors({x: bank.directions[i, 0] * 3 for i, x in enumerate(bank.layers)},
                             "a")
    assert torch.isnan(bare.baseline_std).all() and torch.isnan(bare.resid_norm).all()
    cal = calibrate(bare, model, None, corpus.neutral, start_offset=OFFSET)
    torch.testing.assert_close(cal.baseline_mean[:, 0], bank.baseline_mean[:, 0], atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(cal.baseline_std[:, 0], bank.baseline_std[:, 0], atol=1e-4,
                               rtol=1e-4)
    norms = torch.cat([counted(layer_outputs(model, t)).norm(dim=-1) for t in corpus.neutral], 1)
    torch.testing.assert_close(cal.resid_norm, norms.mean(1), atol=1e-4, rtol=1e-4)
    assert cal.fingerprint["weight_hash"] == bank.fingerprint["weight_hash"]
    # with a model, bank_from_vectors calibrates itself (on the built-in corpus: skipped here)
    with pytest.raises(CorpusError, match="at least one text"):
        calibrate(bare, model, None, [])


# ------------------------------------------------------------------------------ corpora
def test_corpus_json_and_split(tmp_path):
    obj = {"version": 1, "ratings_source": "test",
           "emotions": {"joy": {"valence": 0.9, "arousal": 0.3,
                                "texts": [f"joy {i}" for i in range(11)]},
                        "fear": {"valence": -0.8, "arousal": 0.9,
                                 "texts": [f"fear {i}" for i in range(3)],
                                 "negatives": ["calm a", "calm b"]}},
           "neutral": ["the table", "a chair"], "rising_danger": ["a", "b", "c"]}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(obj))
    c = load_corpus(str(p))
    assert c.names == ["joy", "fear"] and c.extras["joy"] == {"valence": 0.9, "arousal": 0.3}
    assert c.series["rising_danger"] == ["a", "b", "c"] and c.ratings_source == "test"
    train, held = c.split(5)
    assert held["joy"] == ["joy 4", "joy 9"]           # every 5th text (0-based 4, 9)
    assert train.texts["joy"] == [f"joy {i}" for i in (0, 1, 2, 3, 5, 6, 7, 8, 10)]
    assert held["fear"] == [] and train.negatives["fear"] == ["calm a", "calm b"]
    assert train.neutral == c.neutral
    t0, h0 = c.split(0)
    assert t0.texts == c.texts and all(not v for v in h0.values())
    with pytest.raises(CorpusError, match="hold-out period"):
        c.split(1)


def test_corpus_jsonl(tmp_path):
    lines = [{"concept": "joy", "text": "yay"}, {"concept": "joy", "text": "hooray"},
             {"concept": "joy", "text": "meh", "negative": True}, {"neutral": True, "text": "x"},
             {"concept": "fear", "text": "eek"}]
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    c = load_corpus(str(p))
    assert c.texts == {"joy": ["yay", "hooray"], "fear": ["eek"]}
    assert c.negatives == {"joy": ["meh"]} and c.neutral == ["x"]
    # raw U+2028 / U+2029 / U+0085 are legal inside JSON strings: lines split at \n only
    odd = [{"concept": "joy", "text": "a\u2028b\u2029c\x85d"}, {"neutral": True, "text": "x"}]
    p.write_text("\r\n".join(json.dumps(x, ensure_ascii=False) for x in odd), encoding="utf-8")
    assert load_corpus(str(p)).texts == {"joy": ["a\u2028b\u2029c\x85d"]}


@pytest.mark.parametrize("obj,match", [
    ([], "top level"),
    ({"emotions": {}}, "non-empty 'emotions'"),
    ({"emotions": {"a": {"texts": []}}}, "has no texts"),
    ({"emotions": {"a": ["x"]}}, "'texts' list"),
    ({"emotions": {"a": {"texts": ["ok", ""]}}}, "text #1 is not a non-empty string"),
    ({"emotions": {"a": {"texts": ["ok", 3]}}}, "text #1"),
    ({"emotions": {"a": {"texts": ["ok"], "valence": "high"}}}, "valence of 'a'"),
    ({"emotions": {"a": {"texts": ["ok"], "valence": float("nan")}}}, "finite"),
    ({"emotions": {"a": {"texts": ["ok"]}}, "neutral": "x"}, "neutral must be a list"),
    ({"emotions": {"a": {"texts": ["ok"]}}, "version": 2}, "version 2"),
    ({"emotions": {"a": {"texts": ["ok"]}}, "concepts": {}}, "not both"),
])
def test_corpus_errors(obj, match):
    with pytest.raises(CorpusError, match=match):
        corpus_from_dict(obj, "t")


@pytest.mark.parametrize("line,match", [
    ("{bad", "line 2: not valid JSON"),
    ('{"concept": "a"}', "line 2: expected an object with a 'text'"),
    ('{"text": "x"}', "line 2: needs a 'concept'"),
    ('{"text": "x", "concept": "a", "mood": 1}', r"line 2: unknown keys \['mood'\]"),
    ('{"text": "x", "concept": "a", "neutral": true}', "line 2: a neutral line"),
])
def test_corpus_jsonl_errors(line, match):
    with pytest.raises(CorpusError, match=match):
        corpus_from_jsonl(['{"concept": "a", "text": "ok"}', line], "t")


def test_missing_corpus_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus("/nonexistent/corpus.json")


def test_builtin_corpus_schema():
    try:
        c = load_corpus("builtin")
    except FileNotFoundError:
        pytest.skip("steerkernel/data/emotions.json has not landed yet")
    eight = ["happy", "sad", "afraid", "angry", "calm", "desperate", "loving", "disgusted"]
    assert len(c.names) >= 100 and all(n in c.names for n in eight)
    assert all(len(c.texts[n]) >= 20 for n in c.names)
    assert all(len(c.texts[n]) >= 32 for n in eight)
    assert all(math.isfinite(c.extras[n]["valence"]) and math.isfinite(c.extras[n]["arousal"])
               for n in c.names)
    assert c.neutral and c.series.get("rising_danger")
