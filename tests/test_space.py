"""Concept-space geometry per layer (:func:`steerkernel.concepts.analysis.space_by_layer`), its
plot, its place in :func:`report` and the ``steerkernel space`` command -- all on small banks
built in memory (no model is loaded).

* an *aligned* bank whose directions are built so that PC1 is valence and PC2 arousal (r ~ 1,
  tight intervals, held-out readout far above its permutation null), the same directions
  negated (the orientation must undo the sign), and random directions (r near 0, intervals
  spanning 0);
* the leave-one-out readout computed from the Gram matrix equals a direct fit in the residual
  space (explicit PCA, brute-force inner leave-one-out over the ridge grid);
* unrated concepts are left out and listed; fewer than 5 rated concepts is a ValueError.
"""
import json

import numpy as np
import pytest
import torch

from steerkernel.cli.main import main
from steerkernel.concepts import analysis
from steerkernel.concepts.analysis import (RIDGE_GRID, plot_space_by_layer, space_by_layer,
                                           valence_arousal)
from steerkernel.concepts.bank import ConceptBank

PNG = b"\x89PNG\r\n\x1a\n"
FAST = dict(n_boot=300, n_perm=100)
STATS = ("r_pc1_valence", "r_pc1_arousal", "r_pc2_valence", "r_pc2_arousal")


def make_bank(dirs, val=None, aro=None, names=None, default_layer=None):
    """A bank of ``dirs [L, K, d]`` (rows normalised) with ratings ``val`` / ``aro`` (a None
    entry: no rating for that concept)."""
    L, K, d = dirs.shape
    names = names or [f"c{k}" for k in range(K)]
    concepts = {}
    for k, n in enumerate(names):
        m = {}
        if val is not None and val[k] is not None:
            m["valence"] = float(val[k])
        if aro is not None and aro[k] is not None:
            m["arousal"] = float(aro[k])
        concepts[n] = m
    return ConceptBank(names=names, layers=list(range(L)),
                       directions=torch.nn.functional.normalize(dirs.float(), dim=-1),
                       baseline_mean=torch.zeros(L, K), baseline_std=torch.ones(L, K),
                       vector_norms=torch.ones(L, K), resid_norm=torch.ones(L),
                       default_layer=default_layer if default_layer is not None else L - 1,
                       metadata={"method": "test", "concepts": concepts})


def aligned_dirs(K=12, d=24, seed=0):
    """``(x [K, d], valence, arousal)``: unit directions c_k e0 + 0.3 v_k e1 + 0.15 a_k e2
    (c_k ~ 1 fixes the norm; its variance is ~50x below the arousal term's), rotated by a random
    orthogonal matrix, with valence and (shuffled) arousal both evenly spread over [-1, 1]:
    PC1 is the valence axis and PC2 the arousal axis."""
    g = torch.Generator().manual_seed(seed)
    val = torch.linspace(-1, 1, K, dtype=torch.float64)
    aro = val[torch.randperm(K, generator=g)]
    x = torch.zeros(K, d, dtype=torch.float64)
    x[:, 1], x[:, 2] = 0.3 * val, 0.15 * aro
    x[:, 0] = (1 - x[:, 1] ** 2 - x[:, 2] ** 2).sqrt()
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return x @ Q.T, val.tolist(), aro.tolist()


@pytest.fixture(scope="module")
def aligned():
    """Layers: 0 random, 1 aligned, 2 aligned and negated."""
    x, val, aro = aligned_dirs()
    rnd = torch.randn(*x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bank = make_bank(torch.stack([rnd, x, -x]), val, aro, default_layer=1)
    return bank, space_by_layer(bank, **FAST)


@pytest.fixture(scope="module")
def random_bank():
    g = torch.Generator().manual_seed(1)
    K = 20
    return make_bank(torch.randn(2, K, 64, generator=g), torch.rand(K, generator=g).tolist(),
                     torch.rand(K, generator=g).tolist())


def contains(c):
    return c["lo"] - 1e-12 <= c["value"] <= c["hi"] + 1e-12


# ------------------------------------------------------------------------------ the statistics
def test_aligned_bank_pc1_is_valence(aligned):
    bank, res = aligned
    assert res["n_concepts"] == 12 and res["excluded"] == [] and res["names"] == bank.names
    for li in (1, 2):
        row = res["layers"][li]
        assert row["layer"] == li
        c = row["r_pc1_valence"]
        assert c["value"] > 0.99 and c["lo"] > 0.98 and c["hi"] <= 1 + 1e-12 and c["n"] == 12
        assert c["p_perm"] <= 0.02                     # = 1 / (1 + n_perm): no shuffle beats it
        assert row["r_pc2_arousal"]["value"] > 0.9
        assert row["explained_pc1"] > row["explained_pc2"] > 0
        ax = row["valence_axis"]
        assert ax["r"]["value"] > 0.95 and ax["r"]["lo"] > 0.9
        assert ax["p_perm"] <= 0.02 and ax["null_r_95"] < ax["r"]["lo"]
        assert ax["cos_pc1"] > 0.9 and ax["n_pcs"] == 3      # the directions span 3 dims
        assert row["arousal_axis"]["r"]["value"] > 0.9 and row["arousal_axis"]["cos_pc2"] > 0.9
    assert res["best_layer_pc1_valence"] in (1, 2) and res["best_layer_valence_axis"] in (1, 2)
    assert res["reaches_0.6"] is True and res["reaches_0.6_ci_lo"] is True
    assert res["default_layer"] == 1 and res["n_boot"] == 300 and res["n_perm"] == 100


def test_orientation_undoes_the_sign(aligned):
    """Negated directions give the same oriented figures (PC signs are arbitrary)."""
    bank, res = aligned
    a, b = res["layers"][1], res["layers"][2]
    for key in STATS:
        assert a[key]["value"] == pytest.approx(b[key]["value"], abs=1e-9)
        assert a[key]["lo"] == pytest.approx(b[key]["lo"], abs=1e-9)
    assert a["valence_axis"]["r"]["value"] == pytest.approx(b["valence_axis"]["r"]["value"],
                                                            abs=1e-9)
    for row in res["layers"]:
        assert row["r_pc1_valence"]["value"] >= 0 and row["r_pc2_arousal"]["value"] >= 0
        # |r| agrees with the one-layer valence_arousal (which leaves the sign as it comes)
        va = valence_arousal(bank, row["layer"])
        for key in STATS:
            assert abs(row[key]["value"]) == pytest.approx(abs(va[key]), abs=1e-6)


def test_random_bank_r_near_zero(random_bank):
    res = space_by_layer(random_bank, **FAST)
    assert res["reaches_0.6"] is False and res["reaches_0.6_ci_lo"] is False
    for row in res["layers"]:
        c = row["r_pc1_valence"]
        assert 0 <= c["value"] < 0.6 and c["lo"] < 0 < c["hi"]
        assert c["p_perm"] > 0.05
        ax = row["valence_axis"]
        assert abs(ax["r"]["value"]) < 0.6 and ax["p_perm"] > 0.05
        assert ax["n_pcs"] == 19                               # min(K - 1, 20)
        assert row["explained_pc1"] < 0.2                      # no dominant axis


def test_every_interval_contains_its_point(aligned, random_bank):
    for res in (aligned[1], space_by_layer(random_bank, **FAST)):
        for row in res["layers"]:
            for c in [row[k] for k in STATS] + [row["valence_axis"]["r"],
                                                row["arousal_axis"]["r"]]:
                assert contains(c), c
            json.dumps(res, allow_nan=False)                    # no NaN anywhere


def test_seeded_and_reproducible(random_bank):
    threads = torch.get_num_threads()
    a = space_by_layer(random_bank, n_boot=200, n_perm=30, seed=3)
    assert torch.get_num_threads() == threads                   # one-thread section restored
    assert a == space_by_layer(random_bank, n_boot=200, n_perm=30, seed=3)
    b = space_by_layer(random_bank, n_boot=200, n_perm=30, seed=4)
    assert a["layers"][0]["r_pc1_valence"]["value"] == b["layers"][0]["r_pc1_valence"]["value"]
    assert a["layers"][0]["r_pc1_valence"]["lo"] != b["layers"][0]["r_pc1_valence"]["lo"]


def reference_loo(X, y, q_max, grid):
    """Held-out unit-axis coordinates by explicit refits in the residual space."""
    K = len(y)

    def fit(Xt, yt, alpha_rel=None):
        m = Xt.mean(0)
        _, S, Vh = np.linalg.svd(Xt - m, full_matrices=False)
        q = min(q_max, int((S ** 2 > 1e-10 * S[0] ** 2).sum()))
        P = Vh[:q].T                                             # [d, q]
        Z = (Xt - m) @ P

        def ridge(Z, yt, alpha):
            Zc, yc = Z - Z.mean(0), yt - yt.mean()
            w = np.linalg.solve(Zc.T @ Zc + alpha * np.eye(Z.shape[1]), Zc.T @ yc)
            return w, yt.mean() - Z.mean(0) @ w

        scale = float(np.mean(S[:q] ** 2))
        best = None
        for a in grid:                                           # brute-force inner LOO
            err = 0.0
            for j in range(len(yt)):
                keep = np.arange(len(yt)) != j
                w, b = ridge(Z[keep], yt[keep], a * scale)
                err += (yt[j] - (Z[j] @ w + b)) ** 2
            if best is None or err < best[0] - 1e-12:
                best = (err, a)
        w, _ = ridge(Z, yt, best[1] * scale)
        return m, P @ w / np.linalg.norm(w)

    t = np.empty(K)
    for i in range(K):
        keep = np.arange(K) != i
        m, axis = fit(X[keep], y[keep])
        t[i] = (X[i] - m) @ axis
    return t


def test_gram_loo_equals_direct_refits():
    g = torch.Generator().manual_seed(2)
    K, d = 9, 16
    X = torch.nn.functional.normalize(torch.randn(K, d, generator=g, dtype=torch.float64),
                                      dim=-1).numpy()
    y = torch.rand(K, generator=g, dtype=torch.float64).numpy()
    y[:] += 0.8 * X[:, 0]                                        # some signal
    for q_max in (K - 1, 3):
        folds = analysis._loo_folds(torch.from_numpy(X @ X.T), q_max)
        t = analysis._loo_axis_scores(folds, torch.from_numpy(y[:, None]), RIDGE_GRID)[:, 0]
        np.testing.assert_allclose(t.numpy(), reference_loo(X, y, q_max, RIDGE_GRID), atol=1e-8)


def test_unrated_concepts_are_left_out_and_too_few_is_an_error():
    x, val, aro = aligned_dirs(K=8)
    val[0], aro[1] = None, None                                  # c0, c1: not fully rated
    bank = make_bank(x[None], val, aro)
    res = space_by_layer(bank, **FAST)
    assert res["excluded"] == ["c0", "c1"] and res["n_concepts"] == 6
    assert res["names"] == [f"c{k}" for k in range(2, 8)]
    with pytest.raises(ValueError, match=r"at least 5 concepts .*found 4 of 6.*c0, c1"):
        space_by_layer(bank, names=bank.names[:6])
    with pytest.raises(ValueError, match="at least 5 concepts"):
        space_by_layer(make_bank(x[None]))                       # no ratings at all
    with pytest.raises(ValueError, match="n_boot"):
        space_by_layer(make_bank(x[None], val, aro), n_boot=0)


# ------------------------------------------------------------------------------ plot, report
def test_plot_writes_a_png(aligned, tmp_path):
    path = tmp_path / "space.png"
    plot_space_by_layer(aligned[1], str(path))
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000


def test_report_includes_space_by_layer(monkeypatch, tmp_path):
    """``report`` on a stand-in model: the held-out activations are faked, the rest is real."""
    names = ["happy", "sad", "angry", "calm", "loving", "disgusted", "desperate"]
    x, val, aro = aligned_dirs(K=len(names), d=16)
    bank = make_bank(torch.stack([x, -x]), val, aro, names=names)
    g = torch.Generator().manual_seed(0)
    labels = [n for n in names for _ in range(3)]
    means = torch.randn(len(labels), 2, 16, generator=g)
    monkeypatch.setattr(analysis, "heldout_means", lambda *a, **k: (means, labels))
    out = analysis.report(None, None, bank, plots_dir=str(tmp_path))
    sp = out["space_by_layer"]
    assert sp["n_concepts"] == len(names) and [r["layer"] for r in sp["layers"]] == [0, 1]
    assert "concepts_space_by_layer.png" in out["plots"]
    assert (tmp_path / "concepts_space_by_layer.png").read_bytes().startswith(PNG)
    # a bank without ratings: the report still stands, with the reason
    bare = make_bank(torch.stack([x, -x]), names=names)
    out = analysis.report(None, None, bare)
    assert "at least 5 concepts" in out["space_by_layer"]["error"]


# ------------------------------------------------------------------------------ the command
def call(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


@pytest.fixture(scope="module")
def bank_file(aligned, tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "bank.safetensors"
    aligned[0].save(str(path))
    return str(path)


def strict_json(text):
    def no_constant(c):
        raise AssertionError(f"non-JSON constant {c}")
    return json.loads(text, parse_constant=no_constant)


def test_cli_json(bank_file, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert call(["space", "--bank", bank_file, "--json", "--boot", "200", "--perm", "20",
                 "--seed", "1", "--out", str(out), "--plot", str(png)]) == 0
    res = strict_json(capsys.readouterr().out)
    assert res["n_concepts"] == 12 and res["n_boot"] == 200 and res["n_perm"] == 20
    assert res["seed"] == 1 and len(res["layers"]) == 3 and res["reaches_0.6"] is True
    assert res["layers"][1]["r_pc1_valence"]["value"] > 0.99
    assert strict_json(out.read_text()) == res
    assert png.read_bytes().startswith(PNG)


def test_cli_table(bank_file, capsys):
    assert call(["space", "--bank", bank_file, "--boot", "100", "--perm", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("12 rated concepts, 100 bootstrap resamples")
    assert "r(PC1,val) [95% CI]" in lines[1] and "CV val-axis r" in lines[1]
    rows = [ln.split() for ln in lines[2:5]]
    assert [r[0] for r in rows] == ["0", "1*", "2"]              # * marks the default layer
    assert float(rows[1][2]) > 0.99                              # r(PC1, val) at layer 1
    assert lines[-1].startswith("layers 1, 2 reach |r(PC1, valence)| >= 0.6; best PC1: layer")


@pytest.mark.parametrize("argv, message", [
    (["--bank", "/no/such/bank.safetensors"], "does not exist"),
    (["--bank", "{tmp}"], "is a directory"),
    (["--bank", "{unrated}"], "at least 5 concepts"),
    (["--bank", "{bank}", "--boot", "1000000"], "--boot must be at most"),
    (["--bank", "{bank}", "--out", "/no/such/dir/r.json"], "does not exist"),
    (["--model", "/no/such/model"], "is not a local checkpoint directory"),
])
def test_cli_bad_input_exit_2(argv, message, bank_file, tmp_path, capsys):
    unrated = tmp_path / "unrated.safetensors"
    x, _, _ = aligned_dirs(K=6)
    make_bank(x[None]).save(str(unrated))
    argv = [a.format(tmp=tmp_path, unrated=unrated, bank=bank_file) for a in argv]
    assert call(["space"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("steerkernel space: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_missing_bank_never_loads_a_model(monkeypatch, capsys):
    import steerkernel.live as live

    monkeypatch.setattr(live, "load_model_quietly",
                        lambda *a, **k: pytest.fail("the model must not load"))
    assert call(["space", "--bank", "/no/such.safetensors", "--json"]) == 2
    assert not capsys.readouterr().out


def test_cli_default_bank_of_the_model(aligned, monkeypatch, capsys):
    """Without --bank: the model loads and its default bank (steerkernel.default_bank) is
    analysed -- both stand-ins here."""
    import steerkernel.concepts.default as default_mod
    import steerkernel.live as live

    seen = {}

    def load(name):
        seen["model"] = name
        return "MODEL", "TOK"

    def bank(model, tok, progress):
        seen["args"] = (model, tok, progress)
        return aligned[0]

    monkeypatch.setattr(live, "load_model_quietly", load)
    monkeypatch.setattr(default_mod, "default_bank", bank)
    assert call(["space", "--json", "--no-progress", "--boot", "50", "--perm", "5"]) == 0
    assert seen == {"model": None, "args": ("MODEL", "TOK", False)}
    assert strict_json(capsys.readouterr().out)["n_concepts"] == 12
