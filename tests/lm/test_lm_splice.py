"""Splicing and fidelity: exact identity transcoders change nothing; the model is always restored."""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from mechfaith.coders import CoderConfig, SparseCoder  # noqa: E402
from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm.fidelity import FidelityConfig, evaluate_fidelity, loss_recovered, next_token_ce  # noqa: E402
from mechfaith.lm.models import random_model  # noqa: E402
from mechfaith.lm.splice import ablate, splice  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def lm(request):
    return random_model(request.param, seed=3)


def ids_batch(n=3, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (n, seq), generator=g)
    ids[:, 0] = 0
    return ids


def mlp_as_coder(adapter, layer, input_site="mlp_in", output_site="mlp_out"):
    """An exact 'transcoder': the model's own MLP."""
    return adapter.mlp_function(layer, input_site, output_site)


def assert_no_hooks(model):
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


def test_identity_splice_leaves_outputs_unchanged(lm):
    a = lm.adapter
    ids = ids_batch()
    with torch.no_grad():
        clean = a.logits(ids)
        for i_site in ("mlp_in", "mlp_in_normalized"):
            coders = {l: mlp_as_coder(a, l, i_site) for l in (0, 1)}
            with splice(a, coders, input_site=i_site):
                spliced = a.logits(ids)
            torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=1e-5)
        # a wrong coder does change the output (the test can fail)
        with splice(a, {0: lambda x: torch.zeros_like(x) + 1.0}):
            assert not torch.allclose(a.logits(ids), clean, atol=1e-3)
    assert_no_hooks(lm.model)


def test_splice_restores_after_exception(lm):
    a = lm.adapter
    ids = ids_batch()
    with torch.no_grad():
        clean = a.logits(ids)

        def broken(x):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            with splice(a, {1: broken}):
                a.logits(ids)
        with pytest.raises(KeyError):
            with splice(a, {0: lambda x: torch.zeros_like(x)}), ablate(a, [1], "zero"):
                raise KeyError("inside")
        assert_no_hooks(lm.model)
        torch.testing.assert_close(a.logits(ids), clean)


def test_sparse_coder_identity_transcoder_and_keep_bos(lm):
    """A SparseCoder that computes y = x exactly (W_enc = [I, -I], ReLU, W_dec = [I; -I])."""
    a = lm.adapter
    d = a.d_model
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=2 * d, d_out=d))
    with torch.no_grad():
        eye = torch.eye(d)
        coder.W_enc.copy_(torch.cat([eye, -eye], 1))
        coder.W_dec.copy_(torch.cat([eye, -eye], 0))
    ids = ids_batch()
    # splicing "x -> x" from mlp_out... use input = mlp_in and compare with a manual replacement
    with torch.no_grad():
        cache = a.run_with_cache(ids, [(0, "mlp_in")])
        with splice(a, {0: coder}):
            got = a.logits(ids)
        h = a.replace_mlp_out(0, lambda y: cache[(0, "mlp_in")].clone())
        try:
            want = a.logits(ids)
        finally:
            h.remove()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        clean = a.logits(ids)
        with splice(a, {0: coder}, keep_bos=True):
            kept = a.logits(ids)
        if a.family.causal:  # causal: position 0 sees only itself, so it is unchanged
            torch.testing.assert_close(kept[:, 0], clean[:, 0])
            assert not torch.allclose(kept[:, 1:], clean[:, 1:], atol=1e-3)


def test_ablation_matches_manual(lm):
    a = lm.adapter
    ids = ids_batch()
    with torch.no_grad():
        with ablate(a, [1], "zero"):
            zero = a.logits(ids)
        with splice(a, {1: lambda x: torch.zeros_like(x)}):
            ref = a.logits(ids)
        torch.testing.assert_close(zero, ref)
        mean = torch.randn(a.d_model)
        with ablate(a, [1], "mean", {1: mean}):
            m = a.logits(ids)
        with splice(a, {1: lambda x: mean.expand_as(x)}):
            torch.testing.assert_close(m, a.logits(ids))
    with pytest.raises(ConfigError):
        with ablate(a, [1], "mean"):
            pass


def test_fidelity_of_exact_coders(lm):
    a = lm.adapter
    ids = ids_batch(n=5, seq=10, seed=1)
    coders = {0: mlp_as_coder(a, 0), 1: mlp_as_coder(a, 1)}
    rep = evaluate_fidelity(a, ids, coders, cfg=FidelityConfig(batch_contexts=2))
    for s in rep.layer_stats:
        assert s.fve == pytest.approx(1.0, abs=1e-6) and s.mse < 1e-10
    if a.family.causal:
        with torch.no_grad():
            ce = next_token_ce(a.logits(ids), ids).mean().item()
        assert rep.ce_clean == pytest.approx(ce, rel=1e-5)
        assert rep.ce_spliced == pytest.approx(rep.ce_clean, abs=1e-5)
        assert abs(rep.kl_spliced) < 1e-6 and rep.kl_zero_ablated > 0
        assert rep.ce_zero_ablated != pytest.approx(rep.ce_clean, abs=1e-4)
        assert rep.loss_recovered_zero == pytest.approx(1.0, abs=1e-3)
    else:
        assert rep.hidden_rel_error_spliced < 1e-5 and rep.hidden_rel_error_zero_ablated > 1e-3


def test_fidelity_coder_statistics_against_direct_computation():
    lm = random_model("gpt2", seed=4)
    a = lm.adapter
    ids = ids_batch(n=4, seq=9, seed=2)
    coder = SparseCoder(CoderConfig(d_in=32, n_latents=48, d_out=32, activation="topk", k=5),
                        generator=torch.Generator().manual_seed(0))
    rep = evaluate_fidelity(a, ids, {1: coder}, cfg=FidelityConfig(batch_contexts=3, dense_threshold=0.5))
    with torch.no_grad():
        cache = a.run_with_cache(ids, [(1, "mlp_in"), (1, "mlp_out")])
        x = cache[(1, "mlp_in")][:, 1:].reshape(-1, 32)
        y = cache[(1, "mlp_out")][:, 1:].reshape(-1, 32)
        out = coder.forward_full(x)
        fve = 1 - (y - out.y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        density = (out.f != 0).float().mean(0)
        with splice(a, {1: coder}):
            ce_spliced = next_token_ce(a.logits(ids), ids).mean().item()
        logits_clean = a.logits(ids)
        with splice(a, {1: coder}):
            logits_sp = a.logits(ids)
        p = F.log_softmax(logits_clean[:, :-1], -1)
        q = F.log_softmax(logits_sp[:, :-1], -1)
        kl = (p.exp() * (p - q)).sum(-1).mean().item()
    s = rep.layer_stats[0]
    assert s.fve == pytest.approx(fve.item(), rel=1e-5)
    assert s.l0 == pytest.approx(5.0, abs=1e-6) and s.l0_bos == pytest.approx(5.0, abs=1e-6)
    assert s.dead_fraction == pytest.approx((density == 0).float().mean().item())
    assert s.dense_fraction == pytest.approx((density > 0.5).float().mean().item())
    assert sum(s.density_histogram["counts"]) + s.density_histogram["dead"] == 48
    assert rep.ce_spliced == pytest.approx(ce_spliced, rel=1e-5)
    assert rep.kl_spliced == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert rep.loss_recovered_zero == pytest.approx(
        loss_recovered(rep.ce_clean, rep.ce_spliced, rep.ce_zero_ablated))
    assert math.isfinite(rep.loss_recovered_mean)
    assert rep.to_dict()["layer_stats"][0]["layer"] == 1


def test_centred_output_rejected_for_rmsnorm():
    lm = random_model("llama", seed=5)
    with pytest.raises(ConfigError, match="rmsnorm"):
        with splice(lm.adapter, {0: lambda x: x}, output_site="mlp_out_centered"):
            pass


def test_keep_massive_keeps_the_models_output_exactly_where_its_norm_is_large(lm):
    """Splicing a zero 'coder' at layer 0 with keep_massive=r equals a manual replacement that keeps
    y where |y| > r x median|y| over the batch's positions and writes 0 elsewhere."""
    a = lm.adapter
    ids = ids_batch(n=4, seq=10)

    def zero(x):
        return torch.zeros(*x.shape[:-1], a.d_model)

    with torch.no_grad():
        y = a.run_with_cache(ids, [(0, "mlp_out")])[(0, "mlp_out")]
        norms = y.norm(dim=-1)
        sink = norms > 1.1 * norms.flatten().median()
        assert 0 < int(sink.sum()) < sink.numel()  # some positions kept, some replaced
        with splice(a, {0: zero}, keep_massive=1.1):
            got = a.logits(ids) if a.has_lm_head else a.forward(ids).last_hidden_state
        h = a.replace_mlp_out(0, lambda out: torch.where(sink.unsqueeze(-1), out, torch.zeros_like(out)))
        try:
            want = a.logits(ids) if a.has_lm_head else a.forward(ids).last_hidden_state
        finally:
            h.remove()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with splice(a, {0: zero}, keep_massive=1e-9):  # every position kept: the clean model
            every = a.logits(ids) if a.has_lm_head else a.forward(ids).last_hidden_state
        clean = a.logits(ids) if a.has_lm_head else a.forward(ids).last_hidden_state
        torch.testing.assert_close(every, clean, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        with splice(a, {0: zero}, keep_massive=-1.0):
            pass
    assert_no_hooks(lm.model)
