"""The evaluation harness (``steerkernel eval`` / ``calibrate`` / ``probe``): statistics, the
independent judge, the coherence measures, the selection rule, the A/B items, and every
command end to end on a tiny offline Llama (character tokenizer) with a small extracted bank.
"""
import json
import math

import numpy as np
import pytest
import vaderSentiment  # noqa: F401  (the judge: the eval extra, installed by the bootstrap)

from steerkernel import stats
from steerkernel.cli.main import main
from steerkernel.concepts import ConceptBank
from steerkernel.eval import calibrate as cal
from steerkernel.eval import choices, harness, judge

from fixtures_models import needs_smollm2, smollm2, tiny_model_dir  # noqa: F401


def call(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


# ------------------------------------------------------------------------------ statistics
def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    x = np.random.default_rng(1).normal(2.0, 1.0, 50)
    a, b = stats.bootstrap_ci(x, seed=3), stats.bootstrap_ci(x, seed=3)
    assert a == b and a["n"] == 50
    assert a["lo"] < a["value"] < a["hi"] and a["value"] == pytest.approx(x.mean())
    assert 1.4 < a["lo"] and a["hi"] < 2.6          # sd/sqrt(50) ~ 0.14
    assert stats.bootstrap_ci([5.0]) == {"value": 5.0, "lo": 5.0, "hi": 5.0, "n": 1}
    assert stats.bootstrap_ci([1.0, math.nan, 3.0])["n"] == 2
    with pytest.raises(ValueError, match="at least one unit"):
        stats.bootstrap_ci([])


def test_paired_and_correlation_intervals():
    d = stats.paired_diff_ci([3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 4.0])
    assert d["value"] == d["lo"] == d["hi"] == 2.0
    with pytest.raises(ValueError, match="shape"):
        stats.paired_diff_ci([1.0, 2.0], [1.0])
    x = np.arange(20.0)
    r = stats.correlation_ci(x, 3 * x + 1)
    assert r["value"] == pytest.approx(1.0) and r["lo"] == pytest.approx(1.0)
    noise = stats.correlation_ci(x, np.random.default_rng(0).normal(size=20))
    assert noise["lo"] < 0 < noise["hi"]
    with pytest.raises(ValueError, match="at least 3"):
        stats.correlation_ci([1, 2], [2, 1])


# ------------------------------------------------------------------------------ judge
def test_vader_judge_reads_valence():
    j = judge.get_judge("vader")
    s = j.score(["What a wonderful, happy, peaceful day.", "This is awful, I hate it.", "", "  "])
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0 and s[3] == 0
    assert "MIT" in j.describe()["citation"]
    with pytest.raises(ValueError, match="unknown judge"):
        judge.get_judge("gpt")


def test_expected_sign_from_ratings(monkeypatch):
    class B:
        metadata = {"concepts": {"calm": {"valence": 0.45}, "desperate": {"valence": -0.8},
                                 "surprised": {"valence": 0.15}, "x": {}}}
    assert judge.expected_sign(B, "calm") == 1
    assert judge.expected_sign(B, "desperate") == -1
    assert judge.expected_sign(B, "surprised", direction=-1) == -1
    with pytest.raises(ValueError, match="near-neutral"):
        judge.expected_sign(B, "surprised")
    with pytest.raises(ValueError, match="no valence rating"):
        judge.expected_sign(B, "x")
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        judge.expected_sign(B, "calm", direction=2)


def test_missing_judge_package_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("vaderSentiment"):
            raise ImportError("no")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(judge.JudgeUnavailable, match=r"steerkernel\[eval\]"):
        judge.VaderJudge()


# ------------------------------------------------------------------------------ measures
def test_repetition_rate():
    assert harness.repetition_rate("the cat sat on the mat today") == 0.0
    assert harness.repetition_rate("a b") == 0.0
    loop = harness.repetition_rate("go go go go go go go go")
    assert loop == pytest.approx(1 - 1 / 6)
    assert 0 < harness.repetition_rate("I like it. I like it. I like it a lot") < 1


def test_topic_matches_is_likelihood_retrieval():
    own = np.array([1.0, 2.0, 3.0, np.nan])
    other = np.array([[1.5, 2.0, 9.0], [2.0, 2.5, 3.0], [2.0, 4.0, 5.0], [1.0, 1.0, 1.0]])
    assert harness.topic_matches(own, other).tolist() == [True, False, False, False]
    assert harness.distractors(16, 0) == [1, 2, 3]
    assert harness.distractors(16, 15) == [0, 1, 2]
    assert harness.distractors(2, 1) == [0]


def test_prompts_builtin_and_user_files(tmp_path):
    built = harness.load_prompts()
    assert len(built) >= 16 and len({p["id"] for p in built}) == len(built)
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\nsecond prompt\n")
    assert [p["text"] for p in harness.load_prompts(str(f))] == ["first prompt", "second prompt"]
    j = tmp_path / "p.json"
    j.write_text(json.dumps(["a", "b", "c"]))
    assert len(harness.load_prompts(str(j))) == 3
    j.write_text(json.dumps(["only one"]))
    with pytest.raises(ValueError, match="at least 2 prompts"):
        harness.load_prompts(str(j))
    j.write_text(json.dumps({"prompts": [{"id": "x", "text": ""}, "b"]}))
    with pytest.raises(ValueError, match="prompt 0"):
        harness.load_prompts(str(j))
    # a text file whose first line starts like JSON is still one prompt per line; lines split
    # at newlines only (U+2028 belongs to a prompt); broken JSON names the file
    f.write_text("[urgent] build broken\nWrite a poem\u2028in two lines\r\nPlan my weekend\n",
                 encoding="utf-8")
    assert [p["text"] for p in harness.load_prompts(str(f))] == [
        "[urgent] build broken", "Write a poem\u2028in two lines", "Plan my weekend"]
    j.write_text("[1,")
    with pytest.raises(ValueError, match=r"p\.json: not valid JSON"):
        harness.load_prompts(str(j))
    e = tmp_path / "items.json"
    for text, why in (("", "not valid JSON"), ("[" * 100000, "nested too deeply")):
        e.write_text(text)
        with pytest.raises(ValueError, match=f"items.json: not valid JSON.*{why}|{why}"):
            choices.load_items(str(e))


def test_strength_program():
    assert harness.strength_program("calm", 0.0, "8-21") is None
    assert harness.strength_program("calm", 0.02, "8-21") == "calm=+0.02@8-21"
    assert harness.strength_program("calm", -0.01, "3") == "calm=-0.01@3"
    with pytest.raises(ValueError, match="finite"):
        harness.strength_program("calm", math.inf, "3")


# ------------------------------------------------------------------------------ selection rule
def _row(s, effect, lo, ppl=1.0, topic=0.9, rep=0.05):
    iv = lambda v, a=None, b=None: {"value": v, "lo": v if a is None else a,  # noqa: E731
                                    "hi": v if b is None else b, "n": 8}
    return {"strength": s, "effect": iv(effect, lo, effect + 0.1), "ppl_ratio": iv(ppl),
            "on_topic": iv(topic), "repetition": iv(rep), "judge_change": iv(effect),
            "monitor_change": iv(1.0)}


def _result(rows):
    return {"strengths": [_row(0.0, 0.0, -0.05)] + rows}


def test_choose_largest_admissible_effect():
    res = _result([_row(0.01, 0.05, 0.01), _row(0.02, 0.12, 0.03),
                   _row(0.04, 0.30, 0.10, ppl=2.5), _row(0.08, 0.4, 0.2, topic=0.3)])
    pick = cal.choose(res)
    assert pick["recommended"]["strength"] == 0.02
    assert pick["admissible"] == [0.01, 0.02]
    assert any("perplexity x2.50" in r for r in pick["rejected"])
    assert any("on-topic" in r for r in pick["rejected"])


def test_choose_target_and_no_effect():
    res = _result([_row(0.01, 0.05, 0.01), _row(0.02, 0.12, 0.03), _row(0.04, 0.2, 0.1)])
    assert cal.choose(res, target_effect=0.1)["recommended"]["strength"] == 0.02
    far = cal.choose(res, target_effect=5.0)
    assert far["recommended"]["strength"] == 0.04 and far["reason"].startswith("target not")
    unsure = cal.choose(_result([_row(0.01, 0.01, -0.02), _row(0.02, 0.02, -0.01)]))
    assert unsure["recommended"]["strength"] == 0.02 and "reaches 0" in unsure["reason"]
    wrong = cal.choose(_result([_row(0.01, -0.01, -0.05), _row(0.02, -0.02, -0.1)]))
    assert wrong["recommended"] is None and "toward the concept" in wrong["reason"]
    broken = cal.choose(_result([_row(0.01, 0.2, 0.1, rep=0.5)]))
    assert broken["recommended"] is None and broken["reason"] == "no admissible strength"


# ------------------------------------------------------------------------------ A/B items
def test_builtin_items_are_well_formed():
    items = choices.load_items()
    assert len(items) >= 40
    assert len({it["category"] for it in items}) >= 8
    for it in items:
        for f in ("honest", "harmful"):
            assert it[f] == it[f].strip() and not it[f].endswith(".")


def test_item_file_errors(tmp_path):
    f = tmp_path / "i.json"
    f.write_text(json.dumps({"items": [{"id": "a", "scenario": "s", "honest": "h"}]}))
    with pytest.raises(ValueError, match="'harmful'"):
        choices.load_items(str(f))
    good = {"id": "a", "scenario": "s", "honest": "h", "harmful": "x"}
    f.write_text(json.dumps([good, good]))
    with pytest.raises(ValueError, match="duplicate item id"):
        choices.load_items(str(f))
    f.write_text(json.dumps({"items": []}))
    with pytest.raises(ValueError, match="at least one item"):
        choices.load_items(str(f))


def test_p_harmful_is_a_two_way_softmax():
    lp = np.array([[-1.0, -1.0], [-3.0, -1.0], [-1.0, -3.0]])
    p = choices.p_harmful(lp)
    assert p[0] == 0.5 and p[1] == pytest.approx(1 / (1 + math.exp(-2))) and p[2] < 0.5


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """The tiny model, its tokenizer and a 4-concept bank extracted from the built-in corpus
    (so it carries valence ratings), saved to a file too."""
    from steerkernel.concepts.extract import extract_bank
    from steerkernel.models import load_model

    model, tok = load_model(tiny_model_dir)
    bank = extract_bank(model, tok, "builtin", names=["calm", "desperate", "happy", "afraid"],
                        max_length=32, progress=False)
    path = str(tmp_path_factory.mktemp("bank") / "b.safetensors")
    bank.save(path)
    return model, tok, bank, path


def _small(**kw):
    return dict(prompts=harness.load_prompts()[:3], samples=2, max_new_tokens=6,
                batch_size=8, progress=False, **kw)


def test_evaluate_end_to_end(tiny_setup):
    model, tok, bank, _ = tiny_setup
    res = harness.evaluate(model, tok, bank, "calm", [0.05, 0.5], layers="1-2", **_small())
    assert [r["strength"] for r in res["strengths"]] == [0.0, 0.05, 0.5]
    assert res["expected_sign"] == 1 and res["judge"]["name"] == "vader"
    zero = res["strengths"][0]
    assert zero["program"] is None and zero["effect"]["value"] == 0.0
    assert zero["ppl_ratio"]["value"] == pytest.approx(1.0)
    for r in res["strengths"]:
        for key in ("judge", "effect", "monitor_z", "ppl", "repetition", "on_topic",
                    "topic_pmi"):
            v = r[key]
            assert v["n"] == 3 and v["lo"] <= v["value"] + 1e-12 <= v["hi"] + 2e-12, (key, v)
        assert r["ppl"]["value"] > 1
    # the programs took effect: the strongest strength changed the replies
    assert all(ex["replies"]["0.5"] != ex["replies"]["0"] for ex in res["examples"])
    assert res["settings"]["topic_distractors"] == 2
    again = harness.evaluate(model, tok, bank, "calm", [0.05, 0.5], layers="1-2", **_small())
    assert json.dumps(again["strengths"]) == json.dumps(res["strengths"])  # seeded
    json.dumps(res)  # JSON-ready


def test_evaluate_rejects_bad_input_before_generating(tiny_setup):
    model, tok, bank, _ = tiny_setup
    with pytest.raises(Exception, match="nope"):
        harness.evaluate(model, tok, bank, "nope", [0.1], **_small())
    with pytest.raises(Exception, match="layer"):
        harness.evaluate(model, tok, bank, "calm", [0.1], layers="40-50", **_small())
    with pytest.raises(ValueError, match="at least 2 prompts"):
        harness.evaluate(model, tok, bank, "calm", [0.1],
                         **dict(_small(), prompts=[{"id": "a", "text": "x"}]))


def test_probe_end_to_end(tiny_setup):
    model, tok, bank, _ = tiny_setup
    items = choices.load_items()[:4]
    res = choices.probe(model, tok, bank, ["desperate", "calm"], [-0.3, 0.3], layers="1-2",
                        items=items, batch_size=8, progress=False)
    for c in ("desperate", "calm"):
        rows = res["concepts"][c]["strengths"]
        assert [r["strength"] for r in rows] == [-0.3, 0.0, 0.3]
        zero = rows[1]
        assert zero["change"]["value"] == 0.0
        assert all(0 < r["p_harmful"]["value"] < 1 for r in rows)
        assert rows[0]["p_harmful"]["value"] != rows[2]["p_harmful"]["value"]
        assert isinstance(res["concepts"][c]["verdict"], str)
    # the two concepts share the unsteered condition
    assert res["concepts"]["calm"]["strengths"][1] == res["concepts"]["desperate"]["strengths"][1]


def test_calibrate_writes_recommendations_into_the_bank(tiny_setup, tmp_path):
    model, tok, bank, path = tiny_setup
    res = cal.calibrate(model, tok, bank, ["calm"], [0.05, 0.2], layers="1-2", **_small())
    c = res["concepts"]["calm"]
    assert set(c) >= {"recommended", "reason", "admissible", "rejected", "evaluation"}
    b2 = ConceptBank.load(path)
    cal.apply(b2, res)
    out = str(tmp_path / "cal.safetensors")
    b2.save(out)
    rec = ConceptBank.load(out).metadata["concepts"]["calm"]["recommended"]
    if c["recommended"] is None:
        assert rec == {"strength": None, "reason": c["reason"]}
        assert ConceptBank.load(out).recommended("calm") is None
    else:
        assert rec["strength"] in (0.05, 0.2)
        assert ConceptBank.load(out).recommended("calm")["strength"] == rec["strength"]
    assert ConceptBank.load(out).recommended("happy") is None
    with pytest.raises(ValueError, match="positive"):
        cal.calibrate(model, tok, bank, ["calm"], [-0.1], **_small())


# ------------------------------------------------------------------------------ CLI
def test_cli_eval_probe_calibrate(tiny_setup, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    _, _, _, path = tiny_setup
    base = ["--model", tiny_model_dir, "--bank", path, "--layers", "1-2", "--no-progress",
            "--batch-size", "8"]
    gen = ["--n-prompts", "2", "--samples", "1", "--max-new-tokens", "4"]
    out, plot = str(tmp_path / "e.json"), str(tmp_path / "e.png")
    assert call(["eval", "--concept", "calm", "--strengths", "0.2"] + base + gen
                + ["--out", out, "--plot", plot]) == 0
    text = capsys.readouterr().out
    assert "judge effect" in text and "calm @ layers 1-2" in text
    assert json.load(open(out))["evaluations"][0]["concept"] == "calm"
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert call(["probe", "--concepts", "calm", "--strengths", "0.2", "--json"] + base) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_items"] >= 40 and "calm" in res["concepts"]
    saved = str(tmp_path / "cal.safetensors")
    assert call(["calibrate", "--concepts", "calm", "--strengths", "0.1,0.2", "--save-bank",
                 saved] + base + gen) == 0
    assert "recommended" in ConceptBank.load(saved).metadata["concepts"]["calm"]
    assert "=> calm:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["eval", "--concept", "calm", "--strengths", "x"], "comma-separated numbers"),
    (["eval", "--concept", "calm", "--strengths", "0.1,inf"], "finite"),
    (["calibrate", "--concepts", "calm", "--strengths", "-0.1"], "must be positive"),
    (["probe", "--bank", "/nonexistent/b.safetensors"], "/nonexistent/b.safetensors"),
    (["eval", "--concept", "calm", "--prompts", "/nonexistent/p.txt"], "/nonexistent/p.txt"),
    (["eval", "--concept", "calm", "--out", "/nonexistent/dir/e.json"], "/nonexistent/dir"),
    (["calibrate", "--concepts", "calm", "--record", "/nonexistent/dir/r.json"],
     "/nonexistent/dir"),
    (["probe", "--plot", "/nonexistent/dir/p.png"], "/nonexistent/dir"),
])
def test_cli_bad_arguments_fail_fast(argv, msg, capsys, monkeypatch):
    """Checked before the model loads: nothing is computed and nothing is written."""
    import steerkernel.live

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(steerkernel.live, "load_model_quietly", no_model)
    assert call(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_concept_after_loading(tiny_setup, tiny_model_dir, capsys):  # noqa: F811
    _, _, _, path = tiny_setup
    assert call(["eval", "--concept", "zzz", "--model", tiny_model_dir, "--bank", path,
                 "--no-progress"]) == 2
    assert "zzz" in capsys.readouterr().err


def test_shipped_calibration_matches_the_builtin_corpus():
    """``data/calibrated_strengths.json`` holds for the current corpus: edit the corpus, and
    ``benchmarks/run_eval.sh`` must be run again (the demo would silently fall back)."""
    from importlib.resources import files

    from steerkernel.concepts.default import SHIPPED_STRENGTHS, _corpus_sha256
    from steerkernel.steering import parse_program

    data = json.loads((files("steerkernel") / "data" / SHIPPED_STRENGTHS).read_text())
    assert data["corpus_sha256"] == _corpus_sha256()
    assert data["model_fingerprint"]["hidden_size"] == 576
    for name in ("calm", "desperate"):
        rec = data["concepts"][name]
        assert rec["strength"] > 0 and rec["judge"] == "vader"
        parse_program(f"{name}=+{rec['strength']}@{rec['layers']}")


def test_shipped_calibration_reaches_the_default_bank_only_for_its_model(tiny_setup):
    from steerkernel.concepts.default import shipped_recommendations

    model, _, bank, _ = tiny_setup
    assert shipped_recommendations(model, bank) == {}  # another model: nothing merged


@needs_smollm2
def test_eval_and_probe_on_the_embedded_model(smollm2):  # noqa: F811
    """The harness on SmolLM2 with its default bank (cached by the other tests; the shipped
    calibration is merged into it), kept small: 2 prompts, 1 sample, 8 tokens, 3 A/B items."""
    from steerkernel.concepts.default import default_bank

    model, tok = smollm2
    bank = default_bank(model, tok, progress=False)
    assert bank.recommended("desperate")["strength"] > 0   # shipped calibration merged
    res = harness.evaluate(model, tok, bank, "desperate", [0.02],
                           prompts=harness.load_prompts()[:2], samples=1, max_new_tokens=8,
                           progress=False)
    assert res["layers"] == "8-21" and res["expected_sign"] == -1
    row = res["strengths"][1]
    assert row["monitor_change"]["value"] > 0 and row["ppl_ratio"]["value"] > 1
    pr = choices.probe(model, tok, bank, ["calm"], [0.02], items=choices.load_items()[:3],
                       progress=False)
    assert len(pr["concepts"]["calm"]["strengths"]) == 2
