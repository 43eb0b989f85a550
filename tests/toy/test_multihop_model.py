"""The multi-hop ground truth computes exactly the documented chained ANDs, with real ReLU MLPs."""

from __future__ import annotations

import pytest
import torch

from mechfaith.errors import ConfigError
from mechfaith.toy.multihop_data import all_patterns, sample_inputs
from mechfaith.toy.multihop_model import AndMLP, ChainLayout, MultihopNet, truth_table

torch.set_num_threads(1)


@pytest.mark.parametrize("n_chains,n_layers,embed_seed", [(1, 2, None), (2, 3, 0), (3, 2, 5)])
def test_network_computes_the_documented_boolean_functions_exactly(n_chains, n_layers, embed_seed):
    net = MultihopNet(n_chains, n_layers, embed_seed=embed_seed)
    lay = net.layout
    a, w = all_patterns(lay.n_inputs, 0.3)
    assert a.shape == (2 ** lay.n_inputs, lay.n_inputs) and float(w.sum()) == pytest.approx(1.0)
    x, y = net.run(a)
    assert x.shape == y.shape == (n_layers, a.shape[0], net.d_model)
    for t in range(n_layers):
        feats = net.features(y[t])  # MLP_t writes exactly h[k, t+1] for every chain, nothing else
        for k in range(n_chains):
            u, v = (a[:, lay.a(k, 0)], a[:, lay.a(k, 1)]) if t == 0 else (net.features(x[t])[:, lay.h(k, t)],
                                                                           a[:, lay.a(k, t + 1)])
            torch.testing.assert_close(feats[:, lay.h(k, t + 1)], u.round() * v, atol=1e-5, rtol=0)
        others = [j for j in range(lay.n_features) if j not in [lay.h(k, t + 1) for k in range(n_chains)]]
        assert float(feats[:, others].abs().max()) < 1e-5
    final = net.features(x[-1] + y[-1])
    torch.testing.assert_close(final[:, lay.n_inputs:], truth_table(lay, a), atol=1e-5, rtol=0)
    torch.testing.assert_close(final[:, :lay.n_inputs], a, atol=1e-5, rtol=0)


def test_layer_one_reads_the_intermediate_from_the_residual_stream():
    net = MultihopNet(1, 2, embed_seed=None)
    lay = net.layout
    a = torch.tensor([[1.0, 1.0, 1.0]])  # a_p = a_q = a_r = 1: b = c = 1
    x, y = net.run(a)
    assert float(net.features(y[1])[0, lay.h(0, 2)]) == 1.0
    without_b = x[1] - net.E[lay.h(0, 1)]  # remove b: MLP_1 no longer computes c
    assert float(net.mlps[1](without_b).abs().max()) == 0.0
    assert float(net.mlps[1](x[0]).abs().max()) == 0.0  # layer 0's input has no b
    assert isinstance(net.mlps[1], AndMLP) and isinstance(net.mlps[1], torch.nn.Module)


def test_embedding_is_orthonormal_and_pre_activations_avoid_the_kink():
    net = MultihopNet(3, 2, embed_seed=0)
    torch.testing.assert_close(net.E @ net.E.T, torch.eye(net.layout.n_features), atol=1e-5, rtol=0)
    a, _ = all_patterns(net.layout.n_inputs, 0.5)
    x, _ = net.run(a)
    for t, mlp in enumerate(net.mlps):
        pre = x[t] @ mlp.W_in + mlp.b_in
        assert float((pre.abs() - 0.5).abs().min()) < 1e-5 and float(pre.abs().min()) > 0.4


def test_sampling_and_bad_layouts():
    a = sample_inputs(20000, 6, 0.25, torch.Generator().manual_seed(0))
    assert set(a.unique().tolist()) <= {0.0, 1.0} and abs(float(a.mean()) - 0.25) < 0.01
    with pytest.raises(ConfigError):
        ChainLayout(0, 2)
    with pytest.raises(ConfigError):
        MultihopNet(2, 2, d_model=3)
    with pytest.raises(ConfigError):
        sample_inputs(3, 2, 1.0)
