"""steerkernel.attach on HF models: detach fidelity, monitoring, per-row programs, phases,
gates and latches, generate() with a KV cache and left padding, torch.compile, bad input.

Tiny random Llama (fused path) and GPT-NeoX (generic path) models in fp32; every steered
result is compared with :class:`hf_helpers.HookReference` (plain-torch hooks, float64 math).
"""
import pytest
import torch

import steerkernel
from steerkernel.errors import BankMismatchError, SpecError, UnknownConceptError, \
    UnsupportedModelError
from steerkernel.integrations.hf import check_transformers_version, find_decoder_layers
from steerkernel.steering import compile_program

from hf_helpers import HookReference, model_state, random_bank, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: fused RMSNorm / kernel summation order vs torch's


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def bank(llama):
    return random_bank(llama, K=6)


def batch(B=2, S=7, pad=(0, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b, n in enumerate(pad[:B]):
        mask[b, :n] = 0
        ids[b, :n] = 0
    return ids, mask


def position_ids(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def forward(model, ids, mask=None, **kw):
    with torch.no_grad():
        if mask is None:
            return model(ids, **kw).logits
        return model(ids, attention_mask=mask, position_ids=position_ids(mask), **kw).logits


def no_trace_of_attach(model):
    _, layers = find_decoder_layers(model, model.config.num_hidden_layers)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    for layer in layers:
        assert "forward" not in layer.__dict__


# ------------------------------------------------------------------------------ detach
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_attach_without_program_matches_stock_and_detach_is_exact(llama, bank, path):
    ids, mask = batch()
    stock = forward(llama, ids, mask)
    state = model_state(llama)
    h = steerkernel.attach(llama, bank, path=path)
    assert h.path == path
    attached = forward(llama, ids, mask)
    torch.testing.assert_close(attached, stock, **TOL)
    if path == "generic":  # readout only: the residual is written back unchanged
        assert torch.equal(attached, stock)
    h.set_program("c1=+0.8")
    assert not torch.allclose(forward(llama, ids, mask), stock, **TOL)
    h.detach()
    assert torch.equal(forward(llama, ids, mask), stock)
    after = model_state(llama)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    no_trace_of_attach(llama)
    h.detach()  # idempotent
    with pytest.raises(RuntimeError, match="detached"):
        h.set_program("c1=+1")


def test_context_manager_detaches(llama, bank):
    ids, _ = batch(pad=(0, 0))
    stock = forward(llama, ids)
    with steerkernel.attach(llama, bank, program="c0=+1") as h:
        assert h.attached and not torch.allclose(forward(llama, ids), stock)
    assert not h.attached and torch.equal(forward(llama, ids), stock)
    no_trace_of_attach(llama)


# ------------------------------------------------------------------------------ monitoring
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_monitor_scores_match_plain_hooks_and_skip_padding(llama, bank, path):
    ids, mask = batch()
    ref = HookReference(llama, bank)
    forward(llama, ids, mask)
    expect = ref.stacked()  # [B, S, L, K]
    ref.remove()
    with steerkernel.attach(llama, bank, path=path) as h:
        forward(llama, ids, mask)
        tr, z = h.trace(), h.trace(z=True)
    assert [t.shape for t in tr] == [(7, 3, 6), (4, 3, 6)]  # row 1: 3 padded tokens dropped
    torch.testing.assert_close(tr[0], expect[0], **TOL)
    torch.testing.assert_close(tr[1], expect[1, 3:], **TOL)
    zz = (tr[1] - bank.baseline_mean) / bank.baseline_std
    torch.testing.assert_close(z[1], zz)


def test_monitor_can_be_off_or_an_engine(llama, bank):
    from steerkernel.monitor import MonitorEngine

    ids, mask = batch()
    with steerkernel.attach(llama, bank, monitor=False, program="c2=-1") as h:
        off = forward(llama, ids, mask)
        with pytest.raises(RuntimeError, match="monitor"):
            h.trace()
    engine = MonitorEngine(bank.names, bank.layers, max_tokens=64)
    with steerkernel.attach(llama, bank, monitor=engine, program="c2=-1") as h:
        on = forward(llama, ids, mask)
    assert torch.equal(on, off)
    c = compile_program("c2=-1", bank)
    ref = HookReference(llama, bank, [c, c])
    forward(llama, ids, mask)
    ref.remove()
    engine.poll(wait=True)
    rep = engine.report((1, 1))
    assert rep.tokens == 4
    torch.testing.assert_close(rep.trace, ref.stacked()[1, 3:], **TOL)


# ------------------------------------------------------------------------------ steering
PROGRAMS = ["c0=+0.6; c3=ablate@1", "c1<=-0.2; c2>=0.3@0+2", "c4==0.5; c5=-1z"]


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_steered_logits_match_plain_hooks(llama, bank, path, program):
    ids, mask = batch()
    c = compile_program(program, bank)
    ref = HookReference(llama, bank, [c, c])
    expect = forward(llama, ids, mask)
    ref.remove()
    with steerkernel.attach(llama, bank, path=path, program=program) as h:
        got = forward(llama, ids, mask)
        tr = h.trace()
    torch.testing.assert_close(got, expect, **TOL)
    assert tr[1].shape[0] == 4


def test_inference_mode_matches_no_grad(llama, bank):
    """Under torch.inference_mode (no version counters) the fused path still runs, steered, and
    gives the no_grad result (the next-norm hand-over is skipped there, not trusted blindly)."""
    ids, mask = batch()
    with steerkernel.attach(llama, bank, path="fused", program="c0=+0.5; c2=-1") as h:
        expect = forward(llama, ids, mask)
        with torch.inference_mode():
            got = llama(ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        assert h.path == "fused"
    torch.testing.assert_close(got, expect, **TOL)


def test_ablation_zeroes_the_projection_at_steered_layers(llama, bank):
    ids, _ = batch(pad=(0, 0))
    _, layers = find_decoder_layers(llama, 3)
    seen = {}
    hooks = [layers[l].register_forward_hook(
        lambda m, a, o, l=l: seen.__setitem__(l, o @ bank.directions[l].T)) for l in range(3)]
    with steerkernel.attach(llama, bank, program="c3=ablate@0+2") as h:
        forward(llama, ids)
    for hk in hooks:
        hk.remove()
    assert seen[0][..., 3].abs().max() < 1e-5 and seen[2][..., 3].abs().max() < 1e-5
    assert seen[1][..., 3].abs().max() > 1e-2  # layer 1 was not steered
    assert h.trace()[0][:, 1, 3].abs().max() > 1e-2  # readout is pre-intervention


def test_rows_with_different_programs_match_each_row_alone(llama, bank):
    """Each row of a batch with per-row programs equals that row run alone.  Batching only
    changes the GEMM blocking (and, with left padding, adds exactly-zero attention weights), so
    the rows agree to fp32 rounding: 1e-5."""
    ids, mask = batch(B=3, pad=(0, 2, 4), seed=5)
    progs = ["c0=+0.7", None, "c1<=-0.1; c4=ablate"]
    with steerkernel.attach(llama, bank) as h:
        h.set_programs(progs)
        together = forward(llama, ids, mask)
        tr_together = h.trace()
        for b, prog in enumerate(progs):
            h.set_program(prog)
            n = int(mask[b].sum())
            alone = forward(llama, ids[b:b + 1, -n:])
            torch.testing.assert_close(together[b, -n:], alone[0], **TOL)
            torch.testing.assert_close(tr_together[b], h.trace()[0], **TOL)


def test_programs_change_in_place_between_decode_steps(llama, bank):
    from transformers import DynamicCache

    ids, _ = batch(B=2, pad=(0, 0))
    steps = [["c0=+0.5", None], ["c1=-0.5", "c2<=0"], [None, "c3=ablate"]]

    def run(setter):
        cache = DynamicCache(config=llama.config)
        out = []
        with torch.no_grad():
            x = ids
            for progs in steps:
                setter(progs)
                logits = llama(x, past_key_values=cache, use_cache=True).logits
                out.append(logits[:, -1])
                x = logits[:, -1:].argmax(-1)
        return out

    with steerkernel.attach(llama, bank) as h:
        t = h._tables
        ptrs = [x.data_ptr() for x in (t.shift, t.lo, t.hi, t.gate_concept, t.latch)]
        got = run(h.set_programs)
        assert [x.data_ptr() for x in (t.shift, t.lo, t.hi, t.gate_concept, t.latch)] == ptrs
    ref = HookReference(llama, bank)
    expect = run(lambda progs: setattr(ref, "programs",
                                       [compile_program(p, bank) if p else None for p in progs]))
    ref.remove()
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------ generate
def _generate(model, ids, mask, n=6):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores, 1)


GEN_IDS = dict(B=2, S=6, pad=(0, 2), seed=3)


@pytest.fixture(scope="module")
def gate_threshold(llama, bank):
    """A threshold on c3 that the unsteered generation crosses at about half of its (token,
    layer) readouts, halfway between two neighbouring values (no float ties)."""
    ids, mask = batch(**GEN_IDS)
    with steerkernel.attach(llama, bank) as h:
        _generate(llama, ids, mask)
        v = torch.cat([t[..., 3].flatten() for t in h.trace()]).sort().values
    m = len(v) // 2
    return float((v[m - 1] + v[m]) / 2)


@pytest.mark.parametrize("program", [
    "c0=+0.8:generated; c1=-0.5:prompt",
    "c2=+0.9?c3>{thr}",           # gate, not latched
    "c2=+0.9?c3>{thr}!",          # latched
    "c2=+0.9@1+2?c3<{thr}!; c5=+0.3@0",
])
def test_generate_with_cache_padding_phases_and_gates(llama, bank, program, gate_threshold):
    program = program.format(thr=gate_threshold)
    ids, mask = batch(**GEN_IDS)
    c = compile_program(program, bank)
    ref = HookReference(llama, bank, [c, c])
    seq_ref, sc_ref = _generate(llama, ids, mask)
    ref.remove()
    with steerkernel.attach(llama, bank, program=program) as h:
        seq, sc = _generate(llama, ids, mask)
        tr = h.trace()
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(sc, sc_ref, **TOL)
    # prompt tokens (6 and 4 unpadded) + 5 fed-back generated tokens
    assert [t.shape[0] for t in tr] == [11, 9]


def test_gate_and_latch_change_results(llama, bank, gate_threshold):
    """The gate cases above are not vacuous: never/always-open gates bracket them."""
    ids, mask = batch(**GEN_IDS)
    thr = gate_threshold
    with steerkernel.attach(llama, bank) as h:
        res = {}
        for name, prog in [("none", None), ("always", "c2=+0.9"), ("never", "c2=+0.9?c3>1e6"),
                           ("gated", f"c2=+0.9?c3>{thr}"), ("latched", f"c2=+0.9?c3>{thr}!")]:
            h.set_program(prog)
            res[name] = _generate(llama, ids, mask)[1]
    assert torch.equal(res["never"], res["none"])
    assert not torch.allclose(res["gated"], res["none"])
    assert not torch.allclose(res["gated"], res["always"])
    assert not torch.allclose(res["latched"], res["gated"])


def test_generate_left_padding_rows_match_alone(llama, bank):
    ids, mask = batch(B=2, S=6, pad=(0, 3), seed=4)
    with steerkernel.attach(llama, bank) as h:
        h.set_programs(["c0=+0.5", "c1=-0.7"])
        seq, _ = _generate(llama, ids, mask)
        tr = h.trace()
        h.set_program("c1=-0.7")
        seq1, _ = _generate(llama, ids[1:, 3:], mask[1:, 3:])
        tr1 = h.trace()
    assert torch.equal(seq[1, 3:], seq1[0])
    torch.testing.assert_close(tr[1], tr1[0], **TOL)


def test_padding_is_read_from_2d_4d_and_dict_masks():
    """real_tokens: the pads of the forward's S new tokens from every mask form the decoder
    stack can receive; a token is a pad when it may not attend to itself (sliding windows and
    causality always allow the diagonal)."""
    from steerkernel.integrations.hf.attach import real_tokens

    B, S, past = 2, 4, 2
    kv = past + S + 3  # a static cache's unused tail columns
    want = torch.tensor([[True, True, True, True], [False, False, True, True]])
    keys = torch.ones(B, kv, dtype=torch.bool)
    keys[1, past:past + 2] = False
    q = torch.arange(past, past + S)
    causal = torch.arange(kv)[None, :] <= q[:, None]
    allowed = causal[None, None] & keys[:, None, None, :]  # [B, 1, S, kv]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    window = allowed & (torch.arange(kv)[None, :] > q[:, None] - 2)[None, None]
    assert torch.equal(real_tokens(torch.cat([torch.ones(B, 3), want.float()], 1), B, S, 0), want)
    assert torch.equal(real_tokens(allowed, B, S, past), want)
    assert torch.equal(real_tokens(additive, B, S, 0, cache_position=q), want)
    assert torch.equal(real_tokens(additive.masked_fill(~allowed, float("-inf")), B, S, past),
                       want)
    assert torch.equal(real_tokens(window, B, S, past), want)
    assert torch.equal(real_tokens({"sliding_attention": window, "full_attention": allowed},
                                   B, S, past), want)
    for unknown in (None, allowed[:1], allowed[:, :, :2], torch.ones(B, S - 1), object()):
        assert real_tokens(unknown, B, S, past) is None
    assert real_tokens(allowed, B, S, kv) is None  # columns past the mask: not understood


def test_static_cache_generation_skips_padding_like_the_dynamic_cache(llama, bank):
    """generate(cache_implementation="static") hands the decoder stack a 4-D mask: pads are
    still left out of traces and never steered (a pad that fired a latched gate changed the
    text before)."""
    ids, mask = batch(B=2, S=8, pad=(0, 3), seed=5)
    out = {}
    for cache in ("dynamic", "static"):
        with torch.no_grad(), steerkernel.attach(llama, bank, program="c0=+0.5?c1>-9!") as h:
            kw = {} if cache == "dynamic" else {"cache_implementation": "static"}
            seq = llama.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                 pad_token_id=0, **kw)
            out[cache] = seq, h.trace()
    (seq_d, tr_d), (seq_s, tr_s) = out["dynamic"], out["static"]
    assert [t.shape[0] for t in tr_s] == [t.shape[0] for t in tr_d] == [10, 7]
    assert torch.equal(seq_s, seq_d)
    for a, b in zip(tr_s, tr_d):
        torch.testing.assert_close(a, b, **TOL)


def test_multimodal_wrapper_dict_masks_skip_padding():
    """Gemma3ForConditionalGeneration passes its language model a dict of 4-D masks."""
    import transformers as tf

    torch.manual_seed(0)
    tc = tf.Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, sliding_window=16)
    vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, image_size=28, patch_size=14)
    model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        text_config=tc, vision_config=vc, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298)).eval()
    ids = torch.randint(5, 290, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad(), steerkernel.attach(model, random_bank(model, K=3)) as h:
        model(input_ids=ids, attention_mask=mask)
        assert [t.shape[0] for t in h.trace()] == [8, 5]


def test_gradient_forwards_are_refused_whatever_requires_grad():
    """Not only the first parameter: a frozen embedding with trainable layers (LoRA-style), or
    a frozen model fed inputs_embeds that require grad, would lose gradients silently."""
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (1, 5))
    with steerkernel.attach(model, random_bank(model, K=3)):
        model.get_input_embeddings().weight.requires_grad_(False)
        with pytest.raises(RuntimeError, match="inference only"):
            model(ids)
        model.requires_grad_(False)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with pytest.raises(RuntimeError, match="inference only"):
            model(inputs_embeds=emb)
        got = model(ids).logits  # nothing requires grad: allowed, and equal to no_grad
        assert not got.requires_grad
        torch.testing.assert_close(got, forward(model, ids))


def test_one_handle_per_decoder_stack_and_copies_refuse_to_run(bank):
    """attach(model.model) while model is attached (and the reverse) is refused; a deepcopy
    made while attached refuses to run instead of steering with the original's layers."""
    import copy

    model = tiny_model("llama")
    ids = torch.randint(3, 90, (1, 6))
    stock = forward(model, ids)
    with steerkernel.attach(model, bank, program="c0=+5"):
        with pytest.raises(SpecError, match="already steered"):
            steerkernel.attach(model.model, random_bank(model.model, K=3))
        twin = copy.deepcopy(model)
        with pytest.raises(RuntimeError, match="copy"):
            forward(twin, ids)
        steered = forward(model, ids)
    assert not torch.allclose(steered, stock)
    torch.testing.assert_close(forward(model, ids), stock, rtol=0, atol=0)
    no_trace_of_attach(model)
    inner_bank = random_bank(model.model, K=3)
    with steerkernel.attach(model.model, inner_bank):
        with pytest.raises(SpecError, match="already steered"):
            steerkernel.attach(model, bank)
    with steerkernel.attach(model, bank):  # both detached: attaching again works
        pass
    no_trace_of_attach(model)


# ------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(llama, bank, backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    ids, mask = batch()
    with steerkernel.attach(llama, bank, program="c0=+0.6; c1<=0") as h:
        eager = forward(llama, ids, mask)
        tr_eager = h.trace()
        compiled = torch.compile(llama, backend=backend)
        got = forward(compiled, ids, mask)
        tr = h.trace()
        graphs = counters["stats"]["unique_graphs"]
        h.set_program("c2=-0.4")  # tables change in place: the compiled model follows
        got2 = forward(compiled, ids, mask)
        assert counters["stats"]["unique_graphs"] == graphs  # and nothing recompiles
        eager2 = forward(llama, ids, mask)
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, **TOL)
    torch.testing.assert_close(got2, eager2, **TOL)
    assert not torch.allclose(got, got2)
    torch.testing.assert_close(tr[1], tr_eager[1], **TOL)


# ------------------------------------------------------------------------------ bad input
def _assert_untouched(model, state, ids, stock):
    no_trace_of_attach(model)
    assert torch.equal(forward(model, ids), stock)
    after = model_state(model)
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_bad_input_raises_and_leaves_model_untouched(llama, bank):
    ids, _ = batch(pad=(0, 0))
    stock, state = forward(llama, ids), model_state(llama)
    other = tiny_model("gpt2")
    cases = [
        (BankMismatchError, dict(bank=random_bank(other))),                  # another model
        (UnknownConceptError, dict(program="anger=+1")),
        (SpecError, dict(program="c0=+1@7")),                                 # layer out of range
        (SpecError, dict(program=[steerkernel.steering.Steer("c0", "add", 1.0, layers=(-1,))])),
        (SpecError, dict(program="c0=nan")),
        (SpecError, dict(path="turbo")),
        (SpecError, dict(max_batch=0)),
        (SpecError, dict(monitor="yes")),
        (UnsupportedModelError, dict(model=torch.nn.Linear(3, 3))),
    ]
    for err, kw in cases:
        args = dict(model=llama, bank=bank)
        args.update(kw)
        with pytest.raises(err):
            steerkernel.attach(args.pop("model"), args.pop("bank"), **args)
        _assert_untouched(llama, state, ids, stock)
    with pytest.raises(SpecError, match="finite"):  # caught when the steer is built
        steerkernel.steering.Steer("c0", value=float("nan"))


def test_bad_programs_on_a_live_handle(llama, bank):
    ids, mask = batch()
    with steerkernel.attach(llama, bank, program="c0=+0.5", max_batch=2) as h:
        before = forward(llama, ids, mask)
        for bad, err in [("zzz=+1", UnknownConceptError), ("c0=+1@3", SpecError),
                         ("c0=inf", SpecError)]:
            with pytest.raises(err):
                h.set_program(bad)
            with pytest.raises(err):
                h.set_programs([None, bad])
        assert torch.equal(forward(llama, ids, mask), before)  # old program still in force
        with pytest.raises(SpecError, match="max_batch"):
            h.set_programs(["c0=+1"] * 3)
        h.set_programs(["c0=+1"])
        with pytest.raises(SpecError, match="1 programs but the batch has 2 rows"):
            forward(llama, ids, mask)
        h.set_program("c0=+1")
        with pytest.raises(SpecError, match="max_batch"):
            forward(llama, torch.randint(3, 90, (3, 4)))


def test_refusals(llama, bank, monkeypatch):
    with pytest.raises(UnsupportedModelError, match="transformers 4.46.0 is not supported"):
        check_transformers_version("4.46.0")
    with pytest.raises(UnsupportedModelError):
        check_transformers_version("6.1.0")
    assert check_transformers_version("5.19.0") == "5.19.0"
    # the range comes from pyproject.toml (one place), and the refusal names it
    with pytest.raises(UnsupportedModelError, match=r"supported: <5.20,>=5"):
        check_transformers_version("5.20.0")
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.40.2")
    with pytest.raises(UnsupportedModelError, match="4.40.2"):
        steerkernel.attach(llama, bank)
    monkeypatch.undo()
    with pytest.raises(UnsupportedModelError, match="no fused forward"):
        steerkernel.attach(tiny_model("gpt_neox"), random_bank(tiny_model("gpt_neox")),
                           path="fused")
    with steerkernel.attach(llama, bank):
        with pytest.raises(SpecError, match="already"):
            steerkernel.attach(llama, bank)
        with pytest.raises(RuntimeError, match="inference only"):
            llama(torch.randint(3, 90, (1, 4)))  # gradients enabled


def test_unexpected_structure_falls_back_to_generic(bank):
    model = tiny_model("llama")
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(32)
    with pytest.warns(UserWarning, match="generic"):
        h = steerkernel.attach(model, bank)
    assert h.path == "generic"
    h.detach()
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        steerkernel.attach(model, bank, path="fused")


# ------------------------------------------------------------------------------ fusion
def test_norms_are_fused_and_hand_over_is_safe(llama, bank):
    """The fused path calls the pre-attention RMSNorm module only in layer 0 (later ones come
    from the previous end junction) and never the pre-FFN one; a user hook that edits a layer
    output in place invalidates the hand-over, and the result stays exact."""
    ids, mask = batch()
    calls = []
    norms = [(n, m) for n, m in llama.named_modules() if n.endswith("layernorm")]
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: calls.append(n)) for n, m in norms]
    with steerkernel.attach(llama, bank):
        forward(llama, ids, mask)
    for hk in hooks:
        hk.remove()
    assert calls == ["model.layers.0.input_layernorm"]

    _, layers = find_decoder_layers(llama, 3)
    edit = layers[0].register_forward_hook(lambda mod, a, o: o.add_(torch.linspace(-1, 1, 32)))
    try:
        stock = forward(llama, ids, mask)
        with steerkernel.attach(llama, bank):
            attached = forward(llama, ids, mask)
    finally:
        edit.remove()
    torch.testing.assert_close(attached, stock, **TOL)
    assert not torch.allclose(stock, forward(llama, ids, mask), **TOL)  # the edit mattered


def test_hand_over_only_reaches_the_next_layer(bank):
    """Calling decoder layers directly, out of order, never uses a norm meant for another."""
    model = tiny_model("llama")
    _, layers = find_decoder_layers(model, 3)
    with torch.no_grad():
        for layer in layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
        x = torch.randn(1, 5, 32)
        kw = dict(position_embeddings=model.model.rotary_emb(x, torch.arange(5)[None]))
        stock = layers[2](layers[0](x, **kw), **kw)
        with steerkernel.attach(model, bank):
            fused = layers[2](layers[0](x, **kw), **kw)
            in_order = layers[1](layers[0](x, **kw), **kw)
        torch.testing.assert_close(in_order, layers[1](layers[0](x, **kw), **kw), **TOL)
    torch.testing.assert_close(fused, stock, **TOL)


# ------------------------------------------------------------------------------ no host sync
SYNCING_OPS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero", "item")


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that need a tensor's value on the host (``.item()``, ``bool(t)``,
    ``int(t)``, ``torch.equal``, ``nonzero``): on a GPU each is a device synchronisation."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _count_syncs(model, ids, mask=None):
    with torch.no_grad(), _SyncCounter() as counter:
        if mask is None:
            model(ids)
        else:
            model(ids, attention_mask=mask, position_ids=position_ids(mask))
    return counter.calls


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_monitoring_and_steering_add_no_host_sync_to_the_forward(llama, bank, path):
    """The CUDA-free form of "no synchronisation inside the forward": during a steered,
    monitored forward (a MonitorEngine receiving every layer's scores), steerkernel adds no op
    that reads a tensor value on the host; stock HF's own such ops are counted the same way.
    Known exception, asserted exactly: with an attention mask, one read of the mask per
    forward (is any token padding? which ones, for the monitor's row layout)."""
    from steerkernel.monitor import MonitorEngine

    ids, mask = batch()
    stock = _count_syncs(llama, ids)
    stock_masked = _count_syncs(llama, ids, mask)
    engine = MonitorEngine(bank.names, bank.layers, max_tokens=64)
    with steerkernel.attach(llama, bank, monitor=engine, path=path,
                            program="c0=+0.6?c1>0!; c3=ablate?c1>0!") as h:
        _count_syncs(llama, ids)  # warm-up: first-call set-up may read values
        attached = _count_syncs(llama, ids)
        attached_masked = _count_syncs(llama, ids, mask)
        assert h.path == path
    engine.poll(wait=True)
    assert attached == stock, (attached, stock)
    assert sorted(attached_masked) == sorted(stock_masked + ["_local_scalar_dense"]), \
        (attached_masked, stock_masked)
