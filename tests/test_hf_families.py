"""Every fused family (tiny random configs, fp32) and one generic-path architecture: fused path
== generic path == plain-torch forward-hook reference, for monitoring scores and steered logits,
in a left-padded batch and through generate() with a KV cache."""
import pytest
import torch

import steerkernel
from steerkernel.integrations.hf import FAMILIES
from steerkernel.steering import compile_program

from hf_helpers import FUSED_FAMILIES, HookReference, model_state, random_bank, tiny_model

TOL = dict(rtol=2e-5, atol=2e-5)
PROGRAM = "c0=+0.7; c1<=-0.1@1; c2=ablate@0+2; c3>=0.2:generated"


def test_every_fused_family_is_in_the_table():
    assert set(FUSED_FAMILIES) <= set(FAMILIES)


@pytest.fixture(scope="module", params=list(FUSED_FAMILIES) + ["gpt_neox"])
def case(request):
    model = tiny_model(request.param)
    return request.param, model, random_bank(model, K=5)


def inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 96, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    ids[1, :2] = 0
    return ids, mask


def run(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=pos).logits


def test_paths_agree_with_reference(case):
    name, model, bank = case
    ids, mask = inputs()
    stock = run(model, ids, mask)
    state = model_state(model)
    c = compile_program(PROGRAM, bank)
    ref = HookReference(model, bank)
    run(model, ids, mask)
    ref_scores = ref.stacked()
    ref.programs = [c, None]
    ref_steered = run(model, ids, mask)
    ref.remove()

    paths = ["generic"] if name not in FAMILIES else ["fused", "generic"]
    for path in paths:
        with steerkernel.attach(model, bank, path=path) as h:
            assert h.path == path
            plain = run(model, ids, mask)
            tr = h.trace()
            h.set_programs([PROGRAM, None])
            steered = run(model, ids, mask)
        torch.testing.assert_close(plain, stock, **TOL)
        torch.testing.assert_close(tr[0], ref_scores[0], **TOL)
        torch.testing.assert_close(tr[1], ref_scores[1, 2:], **TOL)
        torch.testing.assert_close(steered, ref_steered, **TOL)
        assert not torch.allclose(steered[0], stock[0], **TOL)
        torch.testing.assert_close(steered[1], stock[1], **TOL)  # row 1 has no program
    assert torch.equal(run(model, ids, mask), stock)
    after = model_state(model)
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_generate_agrees_with_reference(case):
    name, model, bank = case
    ids, mask = inputs()
    c = compile_program(PROGRAM, bank)

    def gen():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0)
        return out.sequences, torch.stack(out.scores, 1)

    ref = HookReference(model, bank, [c, c])
    seq_ref, sc_ref = gen()
    ref.remove()
    with steerkernel.attach(model, bank, program=PROGRAM) as h:
        seq, sc = gen()
        tr = h.trace()
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(sc, sc_ref, **TOL)
    assert [t.shape[0] for t in tr] == [6 + 3, 4 + 3]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_within_dtype_tolerance(family):
    """bf16: the fused RMSNorm rounds once (fp32 math) where HF rounds twice, so fused and
    stock differ by bf16 rounding; the steering itself must match the reference likewise."""
    model = tiny_model(family, dtype=torch.bfloat16)
    bank = random_bank(model, K=5)
    ids, mask = inputs()
    stock = run(model, ids, mask).float()
    c = compile_program(PROGRAM, bank)
    ref = HookReference(model, bank, [c, c])
    expect = run(model, ids, mask).float()
    ref.remove()
    with steerkernel.attach(model, bank) as h:
        plain = run(model, ids, mask).float()
        h.set_program(PROGRAM)
        steered = run(model, ids, mask).float()
    tol = dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(plain, stock, **tol)
    torch.testing.assert_close(steered, expect, **tol)
    assert (steered - stock).abs().max() > 10 * (plain - stock).abs().max()
