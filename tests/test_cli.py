"""The ``steerkernel`` command end to end: every command on a tiny offline Llama (saved with a
character tokenizer), ``demo --quick`` on the real embedded model, ``--help`` everywhere, and
bad arguments (one line on stderr, exit 2).

Most runs are in process (``main([...])``) to save interpreter start-ups; a few go through
``python -m steerkernel`` to check real exit codes and streams.  The tiny model's default bank
is built from the built-in corpus truncated to 16 tokens per text (``RECIPE`` patched; the
cache key includes the recipe) in a temporary cache.
"""
import json
import math
import os
from importlib.resources import files
import subprocess
import sys

import pytest
import torch

from steerkernel.cli.main import COMMANDS, main
from steerkernel.concepts import default as default_mod

from fixtures_models import needs_smollm2, tiny_llama, tiny_model_dir  # noqa: F401

REAL_CACHE = os.environ.get("STEERKERNEL_CACHE")
PNG = b"\x89PNG\r\n\x1a\n"
#: emotions in the built-in corpus
N_BUILTIN = len(json.loads((files("steerkernel") / "data" / "emotions.json").read_text())
                ["emotions"])


def call(argv):
    """``main(argv)``'s exit status (argparse's SystemExit included)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sk-cache"))


@pytest.fixture
def tiny(tiny_model_dir, tiny_cache, monkeypatch):  # noqa: F811
    """The tiny model directory, with a temporary cache and a fast default-bank recipe."""
    monkeypatch.setenv("STEERKERNEL_CACHE", tiny_cache)
    monkeypatch.setattr(default_mod, "RECIPE", dict(default_mod.RECIPE, max_length=16))
    return tiny_model_dir


@pytest.fixture(scope="module")
def tiny_bank(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """A small bank file for the tiny model, written by ``steerkernel extract``."""
    out = str(tmp_path_factory.mktemp("bank") / "b.safetensors")
    assert call(["extract", "--model", tiny_model_dir, "--concepts",
                 "calm,desperate,afraid,happy", "--max-length", "32", "--out", out,
                 "--no-progress"]) == 0
    return out


def lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


# ------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_help_of_every_command(cmd, capsys):
    assert call([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: steerkernel {cmd}") and COMMANDS[cmd] in out


def test_top_level_help_and_no_command(capsys):
    assert call(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert call([]) == 2


def test_entry_point_help_and_bad_argument():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "steerkernel", "monitor", "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "--alarm" in r.stdout and "--steer" in r.stdout
    r = subprocess.run([sys.executable, "-m", "steerkernel", "generate", "--top", "0", "hi"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert lines(r.stderr) == [ln for ln in lines(r.stderr)
                               if ln.startswith("steerkernel generate: error:")]
    assert len(lines(r.stderr)) == 1


# ------------------------------------------------------------------------------ bad arguments
BAD = [
    (["bogus"], "steerkernel", "invalid choice"),
    (["monitor", "--top", "0", "hi"], "monitor", "positive integer"),
    (["monitor", "--max-new-tokens", "x", "hi"], "monitor", "positive integer"),
    (["generate", "--temperature", "nan", "hi"], "generate", "finite"),
    (["generate", "--temperature", "-1", "hi"], "generate", "temperature"),
    (["generate", "--steer", "calm=+abc", "hi"], "generate", "cannot parse steering entry"),
    (["monitor", "--steer", "", "hi"], "monitor", "empty steering entry"),
    (["monitor", "--alarm", "desperate zz > 2", "hi"], "monitor", "cannot parse alarm rule"),
    (["monitor", "--model", "/nonexistent/model", "hi"], "monitor", "never downloads"),
    (["monitor", "--bank", "/nonexistent.safetensors", "hi"], "monitor", "does not exist"),
    (["monitor", "--jsonl-log", "/nonexistent-dir/x.jsonl", "hi"], "monitor", "does not exist"),
    (["generate"], "generate", "no prompt"),
    (["generate", "--compare", "hi"], "generate", "--compare needs a --steer"),
    (["monitor", "--scenario", "nope"], "monitor", "unknown scenario"),
    (["monitor", "--scenario", "deadline_agent", "hi"], "monitor", "not both"),
    (["demo", "--scenario", "nope"], "demo", "unknown 'nope'"),
    (["demo", "--steer", "calm=="], "demo", "cannot parse steering entry"),
    (["demo", "--max-new-tokens", "0"], "demo", "positive integer"),
    (["score", "--bank", "/nonexistent.safetensors", "--input", "x.jsonl"], "score",
     "does not exist"),
    (["extract", "--out", "bank.txt"], "extract", ".safetensors"),
    (["bench", "--size", "huge"], "bench", "invalid choice"),
    (["generate", "--steer", ";", "hi"], "generate", "no steering entry"),
    (["generate", "--seed", "99999999999999999999999", "hi"], "generate", "--seed"),
    (["eval", "--concept", "calm", "--seed", "-1"], "eval", "--seed"),
    (["calibrate", "--concepts", "calm", "--save-bank", "x.pt"], "calibrate",
     "saved as .safetensors"),
    (["extract", "--out", "b.safetensors", "--layers", "3-1"], "extract", "--layers"),
    (["extract", "--out", "b.safetensors", "--start-offset", "-5"], "extract", "integer >= 0"),
    (["extract", "--out", "b.safetensors", "--variance-share", "2"], "extract",
     "--variance-share"),
    (["extract", "--out", "b.safetensors", "--holdout-every", "1"], "extract", "hold-out"),
    (["extract", "--out", "b.safetensors", "--concepts", "serenity"], "extract", "serenity"),
]


@pytest.mark.parametrize("argv,cmd,needle", BAD, ids=[" ".join(a)[:40] for a, _, _ in BAD])
def test_bad_arguments_give_one_line(argv, cmd, needle, capsys):
    assert call(argv) == 2
    cap = capsys.readouterr()
    err = lines(cap.err)
    assert len(err) == 1, cap.err
    prefix = "steerkernel" if cmd == "steerkernel" else f"steerkernel {cmd}"
    assert err[0].startswith(f"{prefix}: error: ") and needle in err[0], err[0]
    assert cap.out == ""


def test_bench_refuses_bad_filters_and_impls(capsys):
    # --system-allocator: in process, no re-exec with the allocator environment
    assert call(["bench", "--size", "smoke", "--filter", "(", "--no-report",
                 "--system-allocator"]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err
    assert call(["bench", "--size", "smoke", "--impls", "nope", "--no-report",
                 "--system-allocator"]) == 2
    assert "unknown 'nope'" in capsys.readouterr().err


def test_scenario_list_lists_and_exits_0(capsys):
    assert call(["monitor", "--scenario", "list"]) == 0
    out = capsys.readouterr().out.split()
    assert "deadline_agent" in out and "grieving_user" in out


def test_nothing_is_written_before_a_late_error(tiny, tiny_bank, tmp_path, capsys):
    """Errors that need the bank (an alarm or steer naming an unknown concept) come before the
    JSONL log is created, the header printed or the demo's folder made."""
    log = tmp_path / "new.jsonl"
    assert call(["monitor", "--model", tiny, "--bank", tiny_bank, "--alarm", "nosuch z > 1",
                 "--jsonl-log", str(log), "hi"]) == 2
    cap = capsys.readouterr()
    assert not log.exists() and cap.out == "" and "nosuch" in cap.err
    out_dir = tmp_path / "demo-out"
    assert call(["demo", "--model", tiny, "--out", str(out_dir), "--steer", "nosuch=+0.1",
                 "--quick"]) == 2
    assert not out_dir.exists()


def test_errors_found_after_loading_are_one_line(tiny, tiny_bank, capsys):
    for argv, needle in [
        (["generate", "--steer", "nosuch=+1", "hi"], "'nosuch'"),
        (["monitor", "--layer", "17", "hi"], "layer 17 is not in the bank"),
        (["monitor", "--alarm", "nosuch z > 2", "hi"], "nosuch"),
        (["generate", "--steer", "calm=+0.1@9", "hi"], "9"),
    ]:
        assert call(argv[:1] + ["--model", tiny, "--bank", tiny_bank] + argv[1:]) == 2
        err = lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith(f"steerkernel {argv[0]}: error: ") \
            and needle in err[0], err


# ------------------------------------------------------------------------------ default bank
def test_default_bank_is_built_once_and_cached(tiny):
    from steerkernel.concepts.default import default_bank, default_bank_path
    from steerkernel.models import load_model

    model, tok = load_model(tiny)
    path = default_bank_path(model)
    assert path.startswith(os.environ["STEERKERNEL_CACHE"])
    bank = default_bank(model, tok, progress=False)
    assert os.path.isfile(path) and bank.K == N_BUILTIN and bank.layers == [0, 1, 2, 3]
    mtime = os.path.getmtime(path)
    again = default_bank(model, tok, progress=False)
    assert os.path.getmtime(path) == mtime and torch.equal(again.directions, bank.directions)
    assert again.metadata["default_bank"]["recipe"]["max_length"] == 16
    other = tiny_llama(seed=1)  # other weights: another key, never the cached file
    assert default_bank_path(other) != path
    with open(path, "r+b") as f:  # a corrupted cache file is rebuilt, with a warning
        f.seek(100)
        f.write(b"\xff" * 16)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = default_bank(model, tok, progress=False)
    assert torch.allclose(rebuilt.directions, bank.directions, atol=1e-5)


# ------------------------------------------------------------------------------ monitor
def test_monitor_streams_a_table_with_alarms_and_log(tiny, tiny_bank, tmp_path, capsys):
    log = str(tmp_path / "log.jsonl")
    rc = call(["monitor", "--model", tiny, "--bank", tiny_bank, "The storm is coming",
               "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3", "--top", "2",
               "--alarm", "calm z > -1000 for 2", "--jsonl-log", log])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model ") and "steering: none" in out[0]
    head = next(i for i, ln in enumerate(out) if "top 2 concepts" in ln)
    rows = [ln for ln in out[head + 1:] if ln[:4].strip().isdigit()]
    n = int(next(ln for ln in out if "tokens generated" in ln).split()[0])
    assert len(rows) == n >= 1
    assert all(len([c for c in ln.split("  ") if c.strip().endswith(tuple("0123456789"))]) >= 2
               for ln in rows)
    assert any("! alarm 'calm@" in ln and "prompt token 1" in ln for ln in out)
    events = [json.loads(ln) for ln in open(log)]
    assert events[0]["event"] == "alarm" and events[0]["token"] == 1
    assert events[-1]["event"] == "request" and events[-1]["layers"] == [2]


def test_monitor_json_records(tiny, tiny_bank, capsys):
    rc = call(["monitor", "--model", tiny, "--bank", tiny_bank, "hello there", "--json",
               "--max-new-tokens", "5", "--temperature", "1.0", "--seed", "1", "--top", "3",
               "--steer", "calm=+0.5", "--layer", "1"])
    assert rc == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    toks, summary = recs[:-1], recs[-1]
    assert summary["event"] == "summary" and summary["program"] == "calm=+0.5"
    assert summary["tokens"] == len(toks) and summary["layer"] == 1
    for i, r in enumerate(toks):
        assert r["event"] == "token" and r["index"] == i and r["layer"] == 1
        assert len(r["top"]) == 3 and set(r["z"]) == {"calm", "desperate", "afraid", "happy"}
        zs = [v for _, v in r["top"]]
        assert zs == sorted(zs, reverse=True) and r["top"][0][1] == max(r["z"].values())


def test_monitor_scenario_on_the_default_bank(tiny, capsys):
    """No --bank: the default emotion bank of the tiny model is built (cached) and used."""
    rc = call(["monitor", "--model", tiny, "--scenario", "deadline_agent", "--greedy",
               "--max-new-tokens", "3", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"bank {N_BUILTIN} concepts x 4 layers" in out
    assert os.listdir(os.path.join(os.environ["STEERKERNEL_CACHE"], "banks"))


# ------------------------------------------------------------------------------ generate
def test_generate_streams_text_and_summary(tiny, tiny_bank, capsys):
    rc = call(["generate", "--model", tiny, "--bank", tiny_bank, "Once upon a time",
               "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "2",
               "--steer", "calm=+0.3", "--steer", "desperate<=0z"])
    assert rc == 0
    cap = capsys.readouterr()
    err = lines(cap.err)
    assert len(err) == 1 and err[0].startswith("[steering 'calm=+0.3; desperate<=0z']")
    assert "mean z at layer" in err[0]


def test_generate_steering_changes_greedy_tokens(tiny, tiny_bank, capsys):
    def run(*steer):
        assert call(["generate", "--model", tiny, "--bank", tiny_bank, "Once upon a time",
                     "--max-new-tokens", "8", "--greedy", "--json", *steer]) == 0
        recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
        return [r["token_id"] for r in recs if r["event"] == "token"]
    plain, again, steered = run(), run(), run("--steer", "calm=+3", "--steer", "happy=-3")
    assert plain == again and len(plain) >= 1
    assert steered != plain


def test_generate_compare(tiny, tiny_bank, capsys):
    rc = call(["generate", "--model", tiny, "--bank", tiny_bank, "Once upon a time",
               "--max-new-tokens", "6", "--greedy", "--compare", "--steer", "calm=+2",
               "--json", "--top", "4"])
    assert rc == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    summaries = [r for r in recs if r["event"] == "summary"]
    assert [s["program"] for s in summaries] == [None, "calm=+2"]
    cmp = recs[-1]
    assert cmp["event"] == "compare" and cmp["program"] == "calm=+2"
    if all(s["tokens"] for s in summaries):
        assert len(cmp["reread_mean_z"]) == 4
    rc = call(["generate", "--model", tiny, "--bank", tiny_bank, "Once upon a time",
               "--max-new-tokens", "4", "--greedy", "--compare", "--steer", "calm=+2"])
    out = capsys.readouterr().out
    assert rc == 0 and "--- unsteered ---" in out and "--- steered (calm=+2) ---" in out


def test_generate_compare_rows_share_their_random_draws(tiny, tiny_bank, capsys):
    """Sampling: the unsteered row of --compare is what a plain run with the same seed
    samples, and a program that steers nothing gives the same text in both rows."""
    base = ["generate", "--model", tiny, "--bank", tiny_bank, "Once upon a time",
            "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "5", "--json"]

    def texts(argv):
        assert call(argv) == 0
        recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
        return [r["text"] for r in recs if r["event"] == "summary"]

    alone = texts(base)
    pair = texts(base + ["--compare", "--steer", "calm=+0@0"])
    assert pair == alone * 2


# ------------------------------------------------------------------------------ live loop
def test_live_scores_match_a_reread_and_batching(tiny, tiny_bank):
    """Unsteered, a token's in-loop projections (KV-cache decoding) equal a plain re-read of
    the whole sequence; a left-padded batch generates what each prompt generates alone."""
    from steerkernel.concepts import ConceptBank
    from steerkernel.live import chat_ids, generate_monitored, reread
    from steerkernel.models import load_model

    model, tok = load_model(tiny)
    bank = ConceptBank.load(tiny_bank)
    prompts = [chat_ids(tok, "a short one"), chat_ids(tok, "a much longer prompt, padded")]
    both = generate_monitored(model, tok, bank, prompts, max_new_tokens=6, temperature=0)
    alone = [generate_monitored(model, tok, bank, [p], max_new_tokens=6, temperature=0)[0]
             for p in prompts]
    for g, a in zip(both, alone):
        assert g.token_ids == a.token_ids
        assert torch.allclose(g.scores, a.scores, atol=1e-4, rtol=1e-4)
    rr = reread(model, tok, bank, [g.prompt_ids + g.token_ids for g in both])
    for g, r in zip(both, rr):
        n = len(g.prompt_ids)
        assert torch.allclose(r[:n], g.prompt_scores, atol=1e-4, rtol=1e-4)
        assert torch.allclose(r[n:], g.scores, atol=1e-4, rtol=1e-4)
    steered = generate_monitored(model, tok, bank, prompts[:1], ["calm=+2"], max_new_tokens=4,
                                 temperature=0)[0]
    if steered.token_ids:  # the in-run monitor sees the steered model's own edits
        r = reread(model, tok, bank, [steered.prompt_ids + steered.token_ids])[0]
        assert not torch.allclose(r[len(steered.prompt_ids):], steered.scores, atol=1e-3)


# ------------------------------------------------------------------------------ extract, score
def test_extract_and_score(tiny, tiny_bank, tmp_path, capsys):
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "I am so calm today"}\n{"text": "help, hurry, please!"}\n')
    rc = call(["score", "--model", tiny, "--bank", tiny_bank, "--input", str(texts), "--json"])
    assert rc == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(recs) == 2 and set(recs[0]["scores"]) == {"calm", "desperate", "afraid", "happy"}
    # a raw U+2028 inside a JSON string is one record, not a broken line
    texts.write_text(json.dumps({"text": "calm\u2028line"}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert call(["score", "--model", tiny, "--bank", tiny_bank, "--input", str(texts),
                 "--json"]) == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in recs] == ["calm\u2028line"]
    # a bank without baseline statistics (e.g. imported vectors): raw scores, never "nan z"
    from steerkernel.concepts import ConceptBank

    b = ConceptBank.load(tiny_bank)
    raw = ConceptBank(b.names, b.layers, b.directions, torch.full_like(b.baseline_mean, math.nan),
                      torch.full_like(b.baseline_std, math.nan), b.vector_norms, b.resid_norm,
                      b.default_layer, b.site, b.metadata, b.fingerprint)
    raw_path = str(tmp_path / "raw.safetensors")
    raw.save(raw_path)
    assert call(["score", "--model", tiny, "--bank", raw_path, "--input", str(texts)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "z" not in out.split(":", 1)[1], out
    # monitoring with it: the table says raw, JSON z is null, a z alarm is refused up front
    base = ["monitor", "--model", tiny, "--bank", raw_path, "hi", "--max-new-tokens", "2",
            "--greedy"]
    assert call(base) == 0
    assert "raw projection" in capsys.readouterr().out
    assert call(base + ["--json"]) == 0
    tok = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()][0]
    assert set(tok["z"].values()) == {None} and None not in tok["score"].values()
    log = tmp_path / "log.jsonl"
    assert call(base + ["--alarm", "calm z > 1", "--jsonl-log", str(log)]) == 2
    cap = capsys.readouterr()
    assert "no baseline statistics" in cap.err and not log.exists() and cap.out == ""
    assert call(base + ["--alarm", "calm > 100"]) == 0  # a raw rule is fine


def bank_with_stats_only_for(bank_path, keep, out_path):
    """A copy of a bank file whose concepts outside ``keep`` have no baseline statistics."""
    from steerkernel.concepts import ConceptBank

    b = ConceptBank.load(bank_path)
    drop = [k for k, n in enumerate(b.names) if n not in keep]
    mean, std = b.baseline_mean.clone(), b.baseline_std.clone()
    mean[:, drop] = math.nan
    std[:, drop] = math.nan
    ConceptBank(b.names, b.layers, b.directions, mean, std, b.vector_norms, b.resid_norm,
                b.default_layer, b.site, b.metadata, b.fingerprint).save(str(out_path))
    return str(out_path)


def test_rankings_compare_z_with_z_only(tiny, tiny_bank, tmp_path, capsys):
    """In a bank where only some concepts have statistics, the rankings (table, top,
    top_mean, --compare) hold only those (a raw projection is no z-score); with none, they
    rank raw projections and say so."""
    part = bank_with_stats_only_for(tiny_bank, {"calm", "happy"}, tmp_path / "part.safetensors")
    base = ["monitor", "--model", tiny, "--bank", part, "hi", "--max-new-tokens", "3",
            "--greedy", "--top", "4"]
    assert call(base) == 0
    out = capsys.readouterr().out
    assert "(z; 2 without baseline statistics not ranked at layer" in out, out
    rows = [ln for ln in out.splitlines() if ln[:4].strip().isdigit()]
    assert rows, out
    for ln in rows:
        assert "calm" in ln and "happy" in ln and "afraid" not in ln and "desperate" not in ln
    assert call(base + ["--json"]) == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    toks, summary = recs[:-1], recs[-1]
    assert toks
    for r in toks:
        assert sorted(n for n, _ in r["top"]) == ["calm", "happy"]
        assert r["z"]["afraid"] is None and r["z"]["calm"] is not None
        assert r["score"]["afraid"] is not None
    assert summary["mean_z"]["desperate"] is None and summary["mean_z"]["happy"] is not None
    assert sorted(n for n, _ in summary["top_mean"]) == ["calm", "happy"]

    gen = ["generate", "--model", tiny, "Once upon a time", "--max-new-tokens", "4",
           "--greedy", "--compare", "--steer", "calm=+2", "--json", "--top", "4"]
    assert call(gen + ["--bank", part]) == 0
    cmp = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()][-1]
    assert cmp["event"] == "compare" and cmp["unit"] == "z"
    assert sorted(cmp["reread_mean_z"]) == ["calm", "happy"], cmp
    assert all(v["change"] is not None for v in cmp["reread_mean_z"].values()), cmp
    none = bank_with_stats_only_for(tiny_bank, set(), tmp_path / "none.safetensors")
    assert call(gen + ["--bank", none]) == 0
    cmp = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()][-1]
    assert cmp["unit"] == "raw" and len(cmp["reread_mean_z"]) == 4, cmp
    assert all(v["change"] is not None for v in cmp["reread_mean_z"].values()), cmp


# ------------------------------------------------------------------------------ demo
def test_demo_quick_on_tiny_model(tiny, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    rc = call(["demo", "--model", tiny, "--quick", "--max-new-tokens", "4", "--out",
               str(out_dir), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    for part in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "deadline_agent", "unsteered",
                 "calm=+0.02@1-2; desperate=-0.02@1-2"):
        assert part in out, part
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [s["name"] for s in summary["scenarios"]] == ["deadline_agent"]
    for key in ("circumplex", "trajectory_deadline_agent", "steering_effect"):
        with open(summary["files"][key], "rb") as f:
            assert f.read(8) == PNG


def test_demo_op_only(capsys):
    assert call(["demo", "--op-only"]) == 0
    assert "junction op on backend" in capsys.readouterr().out


@needs_smollm2
def test_demo_quick_on_the_default_model(tmp_path, capsys, monkeypatch):
    """The real thing: SmolLM2-135M-Instruct and its cached emotion bank (built on first use,
    about a minute on two cores), one scenario, 12 tokens unsteered and steered."""
    if REAL_CACHE is None:
        monkeypatch.delenv("STEERKERNEL_CACHE", raising=False)
    else:
        monkeypatch.setenv("STEERKERNEL_CACHE", REAL_CACHE)
    rc = call(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct (30 layers, d=576)" in out
    assert f"{N_BUILTIN} concepts x 30 layers" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    # the shipped calibration of the embedded model is used (data/calibrated_strengths.json)
    assert summary["program_source"].startswith("calibrated strengths")
    assert summary["program"] in out
    scen = summary["scenarios"][0]
    assert scen["name"] == "deadline_agent" and scen["baseline_text"] and scen["steered_text"]
    for c in ("calm", "desperate", "afraid"):
        v = scen["summary"][c]
        assert all(isinstance(v[k], float) for k in ("baseline", "steered", "change"))
    # the in-run monitor sees the steering itself: calm up, desperate down at the shown layer
    assert scen["summary"]["calm"]["steered_in_run"] > scen["summary"]["calm"]["baseline"]
    assert scen["summary"]["desperate"]["steered_in_run"] < \
        scen["summary"]["desperate"]["baseline"]


# ------------------------------------------------------------------------------ doctor, bench
def test_doctor(capsys):
    assert call(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"]["available"]
    assert call(["doctor"]) == 0
    assert "backends:" in capsys.readouterr().out


def test_bench_smoke(tmp_path, capsys):
    rc = call(["bench", "--size", "smoke", "--device", "cpu", "--no-compile", "--out",
               str(tmp_path), "--filter", "steer_fp32", "--impls", "fused_cpu", "--no-report",
               "--system-allocator"])
    assert rc == 0
    assert "fused_cpu" in capsys.readouterr().out
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]
