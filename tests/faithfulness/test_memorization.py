"""Memorization m(f_i, p) and the datapoint-feature detector, on hand-built coders with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.errors import InputError
from mechfaith.faithfulness.memorization import (
    feature_contributions,
    feature_memorization,
    find_datapoint_features,
    jacobian_at_point,
    model_memorization,
)
from mechfaith.toy.data import datapoint
from mechfaith.toy.model import AbsMLP, abs_jacobian

D = 6


def ideal_coder(d: int = D, extra: int = 1) -> SparseCoder:
    """The exact abs solution: latent i = ReLU(x_i), latent d+i = ReLU(-x_i), both writing e_i."""
    c = SparseCoder(CoderConfig(d_in=d, n_latents=2 * d + extra))
    with torch.no_grad():
        eye = torch.eye(d)
        c.W_enc.zero_()
        c.W_enc[:, :d] = eye
        c.W_enc[:, d:2 * d] = -eye
        c.W_dec.zero_()
        c.W_dec[:d] = eye
        c.W_dec[d:2 * d] = eye
        c.b_enc.zero_()
        c.b_enc[2 * d:] = -100.0  # spare latents never fire
        c.b_dec.zero_()
    return c


def plant_datapoint(c: SparseCoder, p: torch.Tensor, scale: float, bias: float, index: int = -1) -> None:
    """Latent ``index``: f = ReLU(p . x + bias), writing scale * p."""
    with torch.no_grad():
        c.W_enc[:, index] = p
        c.b_enc[index] = bias
        c.W_dec[index] = scale * p


def test_ideal_coder_is_exact_and_memorizes_nothing():
    c, p = ideal_coder(), datapoint(D)
    x = torch.randn(50, D)
    torch.testing.assert_close(c(x), AbsMLP(D)(x))
    assert model_memorization(c, p) == 0.0
    assert find_datapoint_features(c, p) == []
    jp = jacobian_at_point(c, p, abs_jacobian(p.unsqueeze(0))[0])
    assert jp.error_fro == pytest.approx(0.0, abs=1e-6) and jp.offdiag_support == 0.0


def test_planted_datapoint_feature_has_hand_computed_memorization():
    c, p = ideal_coder(), datapoint(D)
    plant_datapoint(c, p, scale=0.5, bias=-2.0)
    # f(p) = 3 - 2 = 1; contribution 0.5 p; along p_hat: 0.5 * sqrt(3); best axis: 0.5
    expected = 0.5 * math.sqrt(3) - 0.5
    m = feature_memorization(c, p)
    assert float(m[-1]) == pytest.approx(expected, rel=1e-6)
    assert float(m[:-1].abs().max()) == 0.0
    assert model_memorization(c, p) == pytest.approx(expected, rel=1e-6)
    x = torch.zeros(200, D)
    x[:, 0] = torch.linspace(-1, 1, 200)
    found = find_datapoint_features(c, p, sample=x)
    assert [f.index for f in found] == [2 * D]
    assert found[0].activation_at_p == pytest.approx(1.0)
    assert found[0].cosine_to_p == pytest.approx(1.0, abs=1e-6)
    assert found[0].firing_rate == 0.0  # it fires on p only, never on single-coordinate inputs
    # the Jacobian at p now has the off-diagonal block 0.5 * (1 1 1)^T (1 1 1) off the diagonal
    jp = jacobian_at_point(c, p, abs_jacobian(p.unsqueeze(0))[0])
    assert jp.offdiag_support == pytest.approx(6 * 0.5)


def test_memorization_general_formula_on_weighted_point():
    """Non 0/1 datapoint: m = a (||p|| - max_{j in supp p} p_j) for a feature writing a p at p."""
    p = torch.tensor([2.0, 0.5, 0.0, 1.0, 0.0, 0.0])
    c = ideal_coder()
    plant_datapoint(c, p, scale=0.3, bias=-float(p @ p) + 1.0)  # f(p) = 1
    expected = 0.3 * (float(p.norm()) - 2.0 * 1.0) * 1.0
    # contribution 0.3 p: along p_hat 0.3 ||p||; best support axis 0.3 * 2
    assert model_memorization(c, p) == pytest.approx(expected, rel=1e-6)


def test_single_coordinate_and_partial_features_score_zero():
    c, p = ideal_coder(), datapoint(D)
    # a feature that fires on p but writes only e_1 (reads p, writes one axis): m = 0
    with torch.no_grad():
        c.W_enc[:, -1] = p
        c.b_enc[-1] = -1.0
        c.W_dec[-1] = torch.eye(D)[0] * 2
    assert float(feature_memorization(c, p)[-1]) == 0.0


def test_contributions_shape_and_values():
    c = ideal_coder()
    x = torch.tensor([[0.5, -0.25, 0, 0, 0, 0]])
    contrib = feature_contributions(c, x)
    assert contrib.shape == (1, 2 * D + 1, D)
    assert float(contrib[0, 0, 0]) == 0.5 and float(contrib[0, D + 1, 1]) == 0.25
    torch.testing.assert_close(contrib.sum(1) + c.b_dec, c(x))


def test_bad_inputs_raise_one_line_errors():
    c = ideal_coder()
    with pytest.raises(InputError, match="length d_in"):
        feature_memorization(c, torch.ones(D + 1))
    with pytest.raises(InputError, match="nonzero"):
        feature_memorization(c, torch.zeros(D))
    wide = SparseCoder(CoderConfig(d_in=D, n_latents=4, d_out=D + 2))
    with pytest.raises(InputError, match="d_out == d_in"):
        model_memorization(wide, torch.ones(D))
