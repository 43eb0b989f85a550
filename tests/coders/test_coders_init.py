"""init_from_data: the least-squares skip, the encoder's centring and scaling, as the formulas say."""

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.coders.init import center_encoder_, init_from_data, init_skip_lstsq, scale_encoder_
from mechfaith.errors import ConfigError


def data(seed=0, n=500, d_in=6, d_out=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) + 2.0
    w_true = torch.randn(d_in, d_out, generator=g)
    return x, x @ w_true + 0.3 + 0.01 * torch.randn(n, d_out, generator=g)


def coder(skip=True, seed=1, d_out=4):
    return SparseCoder(CoderConfig(d_in=6, n_latents=8, d_out=d_out, activation="topk", k=2, skip=skip),
                       generator=torch.Generator().manual_seed(seed))


def test_lstsq_skip_init_matches_torch_lstsq():
    x, y = data()
    c = coder()
    fve = init_skip_lstsq(c, x, y, ridge=0.0)
    xa = torch.cat([x, torch.ones(500, 1)], 1).double()
    sol = torch.linalg.lstsq(xa, y.double()).solution
    torch.testing.assert_close(c.W_skip.double(), sol[:6], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c.b_dec.double(), sol[6], atol=1e-5, rtol=1e-4)
    assert fve > 0.99
    # the encoder scaling makes the latents' share of the output the requested fraction
    scale_encoder_(c, x, y, fraction=0.1)
    out = c.forward_full(x)
    part = out.f @ c.W_dec
    rest = y - (out.y_hat - part)
    assert float(part.pow(2).mean().sqrt() / rest.pow(2).mean().sqrt()) == pytest.approx(0.1, rel=1e-3)


def test_init_from_data_equals_the_three_steps():
    x, y = data(3)
    a, b = coder(), coder()
    got = init_from_data(a, x, y, latent_init_fraction=0.3, center_encoder=True, ridge=0.0)
    fve = init_skip_lstsq(b, x, y, ridge=0.0)
    center_encoder_(b, x)
    scale = scale_encoder_(b, x, y, 0.3)
    for name in ("W_skip", "b_dec", "W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert got.skip_fve == fve and got.encoder_scale == scale
    # centring: the pre-activations of the mean input are zero before the scaling
    c = coder()
    init_from_data(c, x, y, latent_init_fraction=0.0)
    assert float((x.mean(0) @ c.W_enc + c.b_enc).abs().max()) < 1e-4


def test_init_from_data_without_skip_uses_the_mean_target_and_can_skip_steps():
    x, y = data(5)
    c, fresh = coder(skip=False), coder(skip=False)
    got = init_from_data(c, x, y, latent_init_fraction=0.0, center_encoder=False)
    torch.testing.assert_close(c.b_dec, y.mean(0))
    torch.testing.assert_close(c.W_enc, fresh.W_enc, rtol=0, atol=0)
    torch.testing.assert_close(c.b_enc, fresh.b_enc, rtol=0, atol=0)
    assert got.skip_fve is None and got.encoder_scale is None
    zero = coder()
    init_from_data(zero, x, y, skip_init="zero", latent_init_fraction=0.0)
    torch.testing.assert_close(zero.W_skip, coder().W_skip, rtol=0, atol=0)
    with pytest.raises(ConfigError):
        init_from_data(coder(), x, y, skip_init="svd")
    with pytest.raises(ConfigError):
        init_from_data(coder(), x, y[:10])
