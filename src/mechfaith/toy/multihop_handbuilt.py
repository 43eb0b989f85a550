"""Two hand-built replacements of the multi-hop network, both exact on the data (known answers for
the metrics and the tests):

- :func:`faithful_clt`: latent k of layer l is MLP_l's neuron of chain k: it reads the two operands
  of hop l from layer l's input (``E[u] + E[v]``, bias -1.5) and writes ``2 E[h[k, l + 1]]`` to
  layer l only. Cross-layer share 0, intermediate-read share 1, intervention responses 1, local
  Jacobian error 0 at every layer.
- :func:`shortcut_clt`: every feature is computed at layer 0 from the raw inputs: latent
  ``k * L + l`` of layer 0 reads ``a[k, 0..l+1]`` (bias ``-(l + 1.5)``, so it fires, at 0.5, only when
  all of them are 1) and writes ``2 E[h[k, l + 1]]`` to layer l. Layers >= 1 have no live latent.
  Cross-layer share 1, intermediate-read share 0, intervention responses 0, local Jacobian error 0
  at layer 0 and 1 at every later layer (its local Jacobian there is 0).
"""

from __future__ import annotations

import torch

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.errors import ConfigError
from mechfaith.toy.multihop_model import AND_BIAS, AND_SCALE, MultihopNet


def _empty(net: MultihopNet, n_latents: int) -> CrossLayerTranscoder:
    clt = CrossLayerTranscoder(CLTConfig(n_layers=net.n_layers, d_in=net.d_model, n_latents=n_latents,
                                         activation="relu"))
    with torch.no_grad():
        for p in clt.parameters():
            p.zero_()
        clt.b_enc.fill_(-1.0)  # every latent dead unless set below
    return clt


@torch.no_grad()
def faithful_clt(net: MultihopNet, n_latents: int | None = None) -> CrossLayerTranscoder:
    """The faithful replacement (module docstring); ``n_latents`` >= n_chains."""
    lay, E = net.layout, net.E
    n = n_latents or lay.n_chains
    if n < lay.n_chains:
        raise ConfigError(f"faithful_clt: needs at least {lay.n_chains} latents per layer")
    clt = _empty(net, n)
    for layer in range(net.n_layers):
        for k in range(lay.n_chains):
            u, v = lay.operands(k, layer)
            clt.W_enc[layer][:, k] = E[u] + E[v]
            clt.b_enc[layer, k] = AND_BIAS
            clt.decoder_to(layer, layer)[k] = AND_SCALE * E[lay.h(k, layer + 1)]
    return clt


@torch.no_grad()
def shortcut_clt(net: MultihopNet, n_latents: int | None = None) -> CrossLayerTranscoder:
    """The shortcut replacement (module docstring); ``n_latents`` >= n_chains * n_layers."""
    lay, E, L = net.layout, net.E, net.n_layers
    n = n_latents or lay.n_chains * L
    if n < lay.n_chains * L:
        raise ConfigError(f"shortcut_clt: needs at least {lay.n_chains * L} latents per layer")
    clt = _empty(net, n)
    for k in range(lay.n_chains):
        for l in range(L):
            i = k * L + l
            clt.W_enc[0][:, i] = E[[lay.a(k, j) for j in range(l + 2)]].sum(0)
            clt.b_enc[0, i] = -(l + 1) + AND_BIAS + 1.0
            clt.W_dec(0)[i, l] = AND_SCALE * E[lay.h(k, l + 1)]
    return clt
