"""Splicing: run the model with some layers' MLP outputs replaced, and always restore it.

- :func:`splice` replaces the MLP output of each given layer by a coder's prediction from that
  layer's input site (the coder sees ``[batch, seq, d_in]`` and returns ``[batch, seq, d_out]``).
- :func:`ablate` replaces MLP outputs by zeros or by fixed mean vectors.

Both are context managers built on forward hooks only: the model's weights and modules are never
touched, and every hook is removed on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from mechfaith.errors import ConfigError
from mechfaith.lm.adapters import ModelAdapter, get_adapter, hooks_removed_after

Coder = Callable[[Tensor], Tensor]  # a SparseCoder or any function [..., d_in] -> [..., d_out]
Recorder = Callable[[int, Tensor, Tensor], None]  # (layer, coder input, coder output)

SPLICE_INPUT_SITES = ("mlp_in", "mlp_in_normalized", "resid_pre", "mlp_out")
# input_site "mlp_out": the coder is an SAE of the MLP output (it reads the MLP's own output and
# replaces it with its reconstruction)
SPLICE_OUTPUT_SITES = ("mlp_out", "mlp_out_centered")


def check_output_site(adapter: ModelAdapter, output_site: str) -> None:
    if output_site not in SPLICE_OUTPUT_SITES:
        raise ConfigError(f"splicing replaces an MLP output: output_site must be one of "
                          f"{', '.join(SPLICE_OUTPUT_SITES)}, not {output_site!r}")
    if output_site == "mlp_out_centered" and adapter.family.norm_kind != "layernorm":
        raise ConfigError(f"a coder of centred MLP outputs cannot replace the MLP of a "
                          f"{adapter.family.name} model: its {adapter.family.norm_kind} does not remove "
                          f"the mean (train on mlp_out instead)")


@contextlib.contextmanager
def splice(model: Any, coders: Mapping[int, Coder], input_site: str = "mlp_in",
           output_site: str = "mlp_out", keep_bos: bool = False,
           record: Recorder | None = None, keep_massive: float = 0.0) -> Iterator[ModelAdapter]:
    """Within the block, layer ``L``'s MLP output is ``coders[L](input at input_site)``.

    ``keep_bos`` leaves position 0 with the model's own MLP output (for coders trained without BOS);
    ``keep_massive`` > 0 also every position whose own MLP output norm exceeds that multiple of the
    median over the batch's positions (attention sinks with massive activations, which a set
    streamed from the model is trained without: ``LMConfig.massive_ratio``).
    ``record(layer, x, y_hat)`` is called with each coder input and output (for statistics).
    """
    adapter = get_adapter(model)
    keep = KeepPositions(keep_bos, keep_massive)
    if input_site not in SPLICE_INPUT_SITES:
        raise ConfigError(f"input_site must be one of {', '.join(SPLICE_INPUT_SITES)}, not {input_site!r}")
    check_output_site(adapter, output_site)
    if not coders:
        raise ConfigError("splice needs at least one (layer, coder) pair")
    layers = [adapter.check_layer(int(l)) for l in coders]
    with hooks_removed_after() as handles:
        for layer in layers:
            coder = coders[layer]
            slot: dict[str, Tensor] = {}

            def grab(t: Tensor, slot: dict[str, Tensor] = slot) -> None:
                slot["x"] = t

            def replace(y: Tensor, slot: dict[str, Tensor] = slot, coder: Coder = coder,
                        layer: int = layer) -> Tensor:
                if "x" not in slot:
                    raise RuntimeError(f"the input of layer {layer} was not captured before its MLP output")
                return _coder_output(coder, slot.pop("x"), y, layer, keep, record)

            if input_site == "mlp_out":
                def sae_replace(y: Tensor, coder: Coder = coder, layer: int = layer) -> Tensor:
                    x = y - y.mean(dim=-1, keepdim=True) if output_site == "mlp_out_centered" else y
                    return _coder_output(coder, x, y, layer, keep, record)
                handles.append(adapter.replace_mlp_out(layer, sae_replace))
                continue
            handles.extend(adapter.hook_site(layer, input_site, grab))
            handles.append(adapter.replace_mlp_out(layer, replace))
        yield adapter


@dataclass(frozen=True)
class KeepPositions:
    """Which positions keep the model's own MLP output (see :func:`splice`)."""

    bos: bool
    massive: float

    def __post_init__(self) -> None:
        if not self.massive >= 0:
            raise ConfigError(f"keep_massive must be >= 0, got {self.massive}")

    def apply(self, y: Tensor, y_hat: Tensor) -> Tensor:
        if self.bos:
            y_hat = torch.cat([y[:, :1], y_hat[:, 1:]], dim=1)
        if self.massive > 0:
            norms = y.float().norm(dim=-1)  # [batch, positions]
            sink = norms > self.massive * norms.flatten().median()
            y_hat = torch.where(sink.unsqueeze(-1), y, y_hat)
        return y_hat


def _coder_output(coder: Coder, x: Tensor, y: Tensor, layer: int, keep: KeepPositions,
                  record: Recorder | None) -> Tensor:
    """The coder's replacement of MLP output ``y`` from input ``x`` (shape-checked, in y's dtype)."""
    y_hat = coder(x.to(_param_dtype(coder, x.dtype)))
    if y_hat.shape != y.shape:
        raise ConfigError(f"the coder of layer {layer} returned shape {tuple(y_hat.shape)}; "
                          f"the MLP output has shape {tuple(y.shape)}")
    if record is not None:
        record(layer, x, y_hat)
    return keep.apply(y, y_hat.to(y.dtype))


def _param_dtype(coder: Any, default: torch.dtype) -> torch.dtype:
    if isinstance(coder, nn.Module):
        for p in coder.parameters():
            return p.dtype
    return default


@contextlib.contextmanager
def ablate(model: Any, layers: list[int] | tuple[int, ...], mode: str = "zero",
           means: Mapping[int, Tensor] | None = None) -> Iterator[ModelAdapter]:
    """Within the block the MLP outputs of ``layers`` are zero (``mode='zero'``) or the fixed
    vectors ``means[L]`` [d_model] (``mode='mean'``)."""
    adapter = get_adapter(model)
    if mode not in ("zero", "mean"):
        raise ConfigError(f"ablation mode must be 'zero' or 'mean', not {mode!r}")
    if mode == "mean" and (means is None or any(int(l) not in means for l in layers)):
        raise ConfigError("mean ablation needs a mean MLP output for every ablated layer")
    with hooks_removed_after() as handles:
        for layer in layers:
            layer = adapter.check_layer(int(layer))
            if mode == "zero":
                fn: Callable[[Tensor], Tensor] = torch.zeros_like
            else:
                mean = means[layer]  # type: ignore[index]

                def fn(y: Tensor, mean: Tensor = mean) -> Tensor:
                    return mean.to(y.device, y.dtype).expand_as(y).clone()
            handles.append(adapter.replace_mlp_out(layer, fn))
        yield adapter
