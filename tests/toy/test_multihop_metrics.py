"""The shortcut metrics on hand-built replacements whose answers are known exactly."""

from __future__ import annotations

import pytest
import torch

from mechfaith.toy.multihop_data import all_patterns
from mechfaith.toy.multihop_handbuilt import faithful_clt, shortcut_clt
from mechfaith.toy.multihop_metrics import measure_clt

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=[(1, 2), (2, 3)])
def case(request):
    from mechfaith.toy.multihop_model import MultihopNet

    net = MultihopNet(*request.param, embed_seed=1)
    a, w = all_patterns(net.layout.n_inputs, 0.4)
    return net, a, w


def test_both_hand_built_replacements_are_exact_on_the_data(case):
    net, a, w = case
    x, y = net.run(a)
    for build in (faithful_clt, shortcut_clt):
        torch.testing.assert_close(build(net)(x), y, atol=1e-5, rtol=0)


def test_faithful_replacement_scores_as_faithful(case):
    net, a, w = case
    m = measure_clt(faithful_clt(net, n_latents=net.layout.n_chains + 2), net, a, w)
    assert len(m.targets) == net.layout.n_chains * (net.n_layers - 1)
    for t in m.targets:
        assert t.cross_layer_share == 0.0
        assert t.intermediate_read_share == pytest.approx(1.0, abs=1e-6)
        assert t.ablation_response == pytest.approx(1.0, abs=1e-5) and t.ablation_error == pytest.approx(0.0, abs=1e-6)
        assert t.injection_response == pytest.approx(1.0, abs=1e-5)
    assert m.jacobian_rel_error == pytest.approx([0.0] * net.n_layers, abs=1e-10)
    assert max(m.fvu) < 1e-9


def test_shortcut_replacement_scores_as_a_shortcut(case):
    net, a, w = case
    m = measure_clt(shortcut_clt(net), net, a, w)
    for t in m.targets:
        assert t.cross_layer_share == 1.0
        assert t.intermediate_read_share == 0.0
        assert t.ablation_response == 0.0 and t.ablation_error == pytest.approx(1.0, abs=1e-6)
        assert t.injection_response == 0.0 and t.injection_error == pytest.approx(1.0, abs=1e-6)
        assert t.write_by_source[1:] == [0.0] * t.layer and t.write_by_source[0] > 0
    assert m.jacobian_rel_error[0] == pytest.approx(0.0, abs=1e-10)  # layer 0's latent for h[k,1] is faithful
    assert m.jacobian_rel_error[1:] == [1.0] * (net.n_layers - 1)  # its local Jacobian at later layers is 0
    assert max(m.fvu) < 1e-9


def test_a_mixture_gives_the_intermediate_value():
    """Half the write of each later feature from each: every share is exactly one half."""
    from mechfaith.toy.multihop_model import MultihopNet

    net = MultihopNet(1, 2, embed_seed=None)
    a, w = all_patterns(net.layout.n_inputs, 0.5)
    fa, sc = faithful_clt(net, 2), shortcut_clt(net, 2)
    with torch.no_grad():  # layer 0 from the shortcut (both its latents), layer 1 from the faithful one
        mix = shortcut_clt(net, 2)
        mix.W_enc[1].copy_(fa.W_enc[1])
        mix.b_enc[1].copy_(fa.b_enc[1])
        mix.W_dec(1).copy_(fa.W_dec(1) * 0.5)
        mix.W_dec(0)[:, 1] *= 0.5  # the shortcut's write to layer 1 halved
    m = measure_clt(mix, net, a, w)
    t = m.targets[0]
    assert t.cross_layer_share == pytest.approx(0.5, abs=1e-6)
    assert t.intermediate_read_share == pytest.approx(0.5, abs=1e-6)
    assert t.ablation_response == pytest.approx(0.5, abs=1e-6)
    assert sc is not mix
