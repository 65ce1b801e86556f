"""``steerkernel extract`` and ``steerkernel score`` on a tiny offline model (saved with a
character tokenizer), in process and once through the installed entry point."""
import json
import os
import subprocess
import sys

import pytest
import torch

from steerkernel import ConceptBank
from steerkernel.cli.extract import parse_layers
from steerkernel.cli.main import main
from steerkernel.concepts.extract import score_texts
from steerkernel.models import load_model

from fixtures_models import tiny_model_dir  # noqa: F401  (fixture)

TEXTS = {
    "joy": ["what a wonderful bright day", "we laughed and sang together", "such lovely news",
            "i am thrilled about the trip", "the party was a delight", "sunshine and smiles"],
    "fear": ["a shadow moved in the dark", "i heard footsteps behind me", "the ice cracked",
             "something is scratching the door", "the lights went out", "a scream outside"],
    "calm": ["the lake was still at dawn", "slow breaths, soft music", "a quiet cup of tea",
             "the cat dozed by the fire", "gentle rain on the roof", "nothing to do today"],
}
NEUTRAL = ["the invoice lists four items", "the train leaves at nine", "a table has four legs",
           "the file is stored on disk", "page two of the manual", "the meeting is on monday"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "c.json"
    p.write_text(json.dumps({"version": 1, "emotions": {
        n: {"valence": v, "arousal": a, "texts": t} for (n, t), (v, a) in
        zip(TEXTS.items(), [(0.9, 0.5), (-0.7, 0.8), (0.6, -0.7)])}, "neutral": NEUTRAL}))
    return str(p)


@pytest.fixture(scope="module")
def extracted(tiny_model_dir, corpus_file, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("bank") / "bank.safetensors")
    assert main(["extract", "--model", tiny_model_dir, "--corpus", corpus_file, "--out", out,
                 "--no-progress"]) == 0
    return out


def test_extract_writes_a_loadable_bank(extracted, tiny_model_dir, capsys):  # noqa: F811
    bank = ConceptBank.load(extracted)
    assert bank.names == ["joy", "fear", "calm"] and bank.layers == [0, 1, 2, 3]
    assert bank.metadata["method"] == "emotion"
    assert bank.metadata["concepts"]["fear"]["valence"] == -0.7
    model, _ = load_model(tiny_model_dir)
    bank.check_fits(model)


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff"])
def test_extract_options(method, tiny_model_dir, corpus_file, tmp_path, capsys):  # noqa: F811
    out = str(tmp_path / "b.safetensors")
    plots = str(tmp_path / "plots")
    rc = main(["extract", "--model", tiny_model_dir, "--corpus", corpus_file, "--out", out,
               "--method", method, "--layers", "1-2", "--concepts", "fear,calm", "--json",
               "--no-progress", "--plots", plots])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layers"] == [1, 2] and summary["K"] == 2 and summary["method"] == method
    bank = ConceptBank.load(out)
    assert bank.names == ["fear", "calm"] and bank.layers == [1, 2]
    with open(summary["plots"][0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_parse_layers():
    assert parse_layers("all", 30) is None
    assert parse_layers("2,5-7, 9", 30) == [2, 5, 6, 7, 9]
    for bad, match in [("a-b", "cannot read"), ("7-5", "cannot read"), ("1,,2", "cannot read"),
                       ("3,40", r"\[40\] are not layers")]:
        with pytest.raises(ValueError, match=match):
            parse_layers(bad, 30)


def _err(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_extract_errors(tiny_model_dir, corpus_file, tmp_path, capsys):  # noqa: F811
    out = str(tmp_path / "b.safetensors")
    base = ["extract", "--model", tiny_model_dir, "--no-progress"]
    cases = [
        (base + ["--corpus", corpus_file, "--out", str(tmp_path / "b.pt")], "must be a .safetensors"),
        (base + ["--corpus", corpus_file, "--out", str(tmp_path / "no" / "b.safetensors")],
         "does not exist"),
        (base + ["--corpus", str(tmp_path / "none.json"), "--out", out], "does not exist"),
        (base + ["--corpus", corpus_file, "--out", out, "--layers", "9"], "not layers"),
        (base + ["--corpus", corpus_file, "--out", out, "--concepts", "joy,anger"], "anger"),
        (["extract", "--model", str(tmp_path / "nomodel"), "--corpus", corpus_file, "--out", out],
         "never downloads"),
    ]
    for argv, match in cases:
        rc, err = _err(capsys, argv)
        assert rc == 2 and match in err, (argv, err)
        assert not os.path.exists(out)
    bad = tmp_path / "bad.json"
    bad.write_text('{"emotions": {"x": {"texts": [1]}}}')
    rc, err = _err(capsys, base + ["--corpus", str(bad), "--out", out])
    assert rc == 2 and "text #0" in err


def _jsonl(tmp_path, texts, name="in.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(p)


def test_score_json(extracted, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    texts = ["what a lovely morning", "the door creaked in the dark", "the invoice is due"]
    rc = main(["score", "--bank", extracted, "--input", _jsonl(tmp_path, texts), "--model",
               tiny_model_dir, "--json", "--layer", "2"])
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == texts and all(r["layer"] == 2 for r in rows)
    bank = ConceptBank.load(extracted)
    model, tok = load_model(tiny_model_dir)
    scores, z = score_texts(model, tok, bank, texts, 2)
    for i, r in enumerate(rows):
        assert list(r["scores"]) == bank.names
        assert [r["scores"][n] for n in bank.names] == pytest.approx(scores[i].tolist(), abs=1e-5)
        assert [r["z"][n] for n in bank.names] == pytest.approx(z[i].tolist(), abs=1e-4)
    # default layer without --layer; a human-readable table without --json
    assert main(["score", "--bank", extracted, "--input", _jsonl(tmp_path, texts[:1]),
                 "--model", tiny_model_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layer"] == bank.default_layer
    assert main(["score", "--bank", extracted, "--input", _jsonl(tmp_path, texts[:1]),
                 "--model", tiny_model_dir, "--top", "2"]) == 0
    assert capsys.readouterr().out.count("z") >= 2


def test_score_errors(extracted, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    good = _jsonl(tmp_path, ["hello"])
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "ok"}\n\n{"txt": "no"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    other = tmp_path / "other"
    from fixtures_models import char_tokenizer, tiny_llama

    tiny_llama(hidden=32).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    cases = [
        (["--bank", extracted, "--input", str(bad_line)], "line 3"),
        (["--bank", extracted, "--input", str(empty)], "no texts"),
        (["--bank", extracted, "--input", good, "--layer", "7"], "layer 7 is not in the bank"),
        (["--bank", str(tmp_path / "nope.safetensors"), "--input", good], "does not exist"),
        (["--bank", good, "--input", good], "not a valid concept bank"),
        (["--bank", extracted, "--input", str(tmp_path / "none.jsonl")], "does not exist"),
    ]
    for argv, match in cases:
        rc, err = _err(capsys, ["score", "--model", tiny_model_dir] + argv)
        assert rc == 2 and match in err, (argv, err)
    rc, err = _err(capsys, ["score", "--model", str(other), "--bank", extracted, "--input", good])
    assert rc == 2 and "hidden_size: bank 64, model 32" in err


def test_entry_point_subprocess(extracted, tiny_model_dir, tmp_path):  # noqa: F811
    """The console entry (``python -m steerkernel``) end to end, offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    inp = _jsonl(tmp_path, ["gentle rain on the roof"])
    proc = subprocess.run([sys.executable, "-m", "steerkernel", "score", "--bank", extracted,
                           "--input", inp, "--model", tiny_model_dir, "--json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert set(row) == {"text", "layer", "scores", "z"} and set(row["z"]) == set(TEXTS)
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v))
               for v in row["z"].values())
