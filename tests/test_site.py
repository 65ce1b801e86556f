"""The junction site shared by the HF and vLLM integrations: which tables a call passes for
each per-forward steering state, against the public op on the same inputs."""
import pytest
import torch

from steerkernel import ConceptBank, backends
from steerkernel.integrations.site import JunctionSite, Scratch, Steering
from steerkernel.ops import junction
from steerkernel.steering import SlotTables, compile_program

BACKEND = "cpu" if backends.backend_status()["cpu"][0] else "reference"
T, d, K = 6, 32, 3


def _site():
    q = torch.linalg.qr(torch.randn(1, d, K, generator=torch.Generator().manual_seed(0)))
    bank = ConceptBank(
        names=["calm", "fear", "joy"], layers=[0], directions=q.Q.transpose(1, 2).contiguous(),
        baseline_mean=torch.zeros(1, K), baseline_std=torch.ones(1, K),
        vector_norms=torch.ones(1, K), resid_norm=torch.ones(1), default_layer=0)
    V = bank.directions[0].float().contiguous()
    tables = SlotTables(1, 3, K)
    # gated on c1 above -inf (always fires) and latching; slot 2 ungated
    tables.assign(1, compile_program(f"{bank.names[0]}=+1abs?{bank.names[1]}>-1e30!", bank),
                  "prompt")
    tables.assign(2, compile_program(f"{bank.names[2]}=-1abs", bank), "prompt")
    op = backends.op_for(BACKEND)
    return JunctionSite(op, Scratch(K, "cpu", rows=4), V=V, tables=tables), tables, V


@pytest.mark.parametrize("gated,latched", [(False, False), (True, False), (True, True)])
def test_site_passes_the_tables_the_forward_needs(gated, latched):
    site, tables, V = _site()
    g = torch.Generator().manual_seed(0)
    r, x, w = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g), torch.rand(d)
    slot = torch.tensor([0, 1, 2, 1, 0, 2], dtype=torch.int32)
    shift, lo, hi, gc, gt, ga, latch = tables.layer_args(0)
    latch_before = latch.clone()
    ref_latch = latch.clone()
    rr = r.clone()
    s, n, o = junction(rr, V, x=x, slot=slot, shift=shift, lo=lo, hi=hi,
                       gate_concept=gc if gated else None, gate_threshold=gt if gated else None,
                       gate_above=ga if gated else None,
                       latch=ref_latch if gated and latched else None, weight=w, eps=1e-6,
                       backend=BACKEND)
    scores = torch.empty(T, K)
    got = site(r, x, steering=Steering(slot, gated, latched), scores=scores, weight=w, eps=1e-6)
    assert torch.equal(r, rr) and torch.equal(scores, s) and torch.equal(got, o)
    if gated and latched:
        assert latch.tolist() == [0, 1, 0]
    else:
        assert torch.equal(latch, latch_before)


def test_site_without_steering_monitors_and_a_site_without_V_adds():
    site, _, V = _site()
    r, x, w = torch.randn(T, d), torch.randn(T, d), torch.rand(d)
    rr = r.clone()
    s, _, _ = junction(rr, V, x=x, backend=BACKEND)
    site.scratch.reserve(T)
    assert site(r, x) is None  # no weight: no norm output; scores go to the scratch
    assert torch.equal(r, rr) and torch.equal(site.scratch.scores(T), s)
    plain = JunctionSite(site.op, site.scratch)
    r2 = r.clone()
    out = plain(r2, x, weight=w, eps=1e-6)
    _, _, o = junction(rr, None, x=x, weight=w, eps=1e-6, backend=BACKEND)
    assert torch.equal(r2, rr) and torch.equal(out, o)


def test_scratch_hands_out_fixed_views_and_fresh_buffers_beyond_them():
    sc = Scratch(K, "cpu", rows=4)
    a, b = sc.scores(3), sc.scores(4)
    assert a.data_ptr() == b.data_ptr() and sc.norms(2).shape == (2,)
    big = sc.scores(9)
    assert big.shape == (9, K) and big.data_ptr() != a.data_ptr() and sc.rows == 4
    sc.reserve(9)
    assert sc.rows >= 9 and sc.scores(9).shape == (9, K)
