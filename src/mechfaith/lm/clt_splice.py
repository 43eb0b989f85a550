"""Splicing a cross-layer transcoder into its model: each block layer's MLP output replaced by the
CLT's reconstruction, which sums the writes of that layer's latents and of every earlier block
layer's latents that reach it.

Within :func:`splice_clt`, a hook at each block layer's input site computes that layer's latents
from the *current* run's input (so a replaced earlier layer changes later latents, as in the
model), and the MLP output of each layer in ``replace`` (default: every block layer) becomes
``b_dec[t] + sum_s f_s W_dec[s -> t] (+ x_t W_skip[t])``. Layers outside ``replace`` keep the
model's MLP output, but their latents are still computed and still write to the replaced layers
after them. Hooks only; every hook is removed on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from torch import Tensor

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.errors import ConfigError
from mechfaith.lm.adapters import ModelAdapter, get_adapter, hooks_removed_after
from mechfaith.lm.splice import SPLICE_INPUT_SITES, KeepPositions, check_output_site

CLTRecorder = Callable[[int, Tensor, Tensor, Tensor], None]  # (model layer, input, latents, reconstruction)


@contextlib.contextmanager
def splice_clt(model: Any, clt: CrossLayerTranscoder, replace: Sequence[int] | None = None,
               input_site: str = "mlp_in", output_site: str = "mlp_out", keep_bos: bool = False,
               keep_massive: float = 0.0, record: CLTRecorder | None = None) -> Iterator[ModelAdapter]:
    """Within the block, the model runs with the CLT replacing the MLP outputs of ``replace`` (model
    layer indices; default every layer of the CLT's block). ``keep_bos`` / ``keep_massive`` as in
    :func:`mechfaith.lm.splice.splice`. ``record(layer, x, f, y_hat)`` sees every replaced layer."""
    adapter = get_adapter(model)
    keep = KeepPositions(keep_bos, keep_massive)
    if input_site not in SPLICE_INPUT_SITES or input_site == "mlp_out":
        raise ConfigError(f"a CLT reads an MLP input site, not {input_site!r}")
    check_output_site(adapter, output_site)
    block = [adapter.check_layer(l) for l in clt.cfg.layers]
    chosen = block if replace is None else [adapter.check_layer(int(l)) for l in replace]
    outside = sorted(set(chosen) - set(block))
    if outside or not chosen:
        raise ConfigError(f"the CLT covers layers {block[0]}-{block[-1]}; cannot replace layers {outside or 'none'}")
    latents: dict[int, Tensor] = {}  # block index -> f of the current forward pass
    inputs: dict[int, Tensor] = {}
    dtype = clt.W_enc.dtype
    with hooks_removed_after() as handles:
        for t, layer in enumerate(block):
            def grab(x: Tensor, t: int = t) -> None:
                xs = x.to(dtype)
                latents[t] = clt.encode_layer(t, xs)[0]
                inputs[t] = xs

            handles.extend(adapter.hook_site(layer, input_site, grab))
            if layer not in chosen:
                continue

            def swap(y: Tensor, t: int = t, layer: int = layer) -> Tensor:
                if t not in inputs:
                    raise RuntimeError(f"the input of layer {layer} was not captured before its MLP output")
                y_hat = clt.decode_layer(t, latents, inputs[t])
                if record is not None:
                    record(layer, inputs[t], latents[t], y_hat)
                return keep.apply(y, y_hat.to(y.dtype))

            handles.append(adapter.replace_mlp_out(layer, swap))
        try:
            yield adapter
        finally:
            latents.clear()
            inputs.clear()
