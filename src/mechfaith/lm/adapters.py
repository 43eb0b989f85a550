"""Model adapters: where each layer's MLP input/output (and residual stream, norms, attention,
embeddings, unembedding) live in a Hugging Face transformers model, and plain PyTorch hooks on them.

One :class:`FamilySpec` per architecture family names the modules by their attribute paths;
:class:`ModelAdapter` resolves them on a model and registers hooks. Supported families:

- ``gpt2``  (``GPT2Model`` / ``GPT2LMHeadModel``): pre-LN, LayerNorm, GELU MLP ``mlp``.
- ``llama`` (``LlamaModel`` / ``LlamaForCausalLM``, e.g. SmolLM2): pre-norm RMSNorm, gated SiLU MLP.
- ``bert``  (``BertModel`` / ``BertForMaskedLM``, e.g. MiniLM): post-LN; the MLP is
  ``output.dense(intermediate(x))``, whose result is then added to ``x`` and LayerNorm-ed.

Activation sites of layer ``L`` (all [batch, seq, d_model]):

- ``resid_pre``: the block's input (residual stream before the layer).
- ``mlp_in``: the MLP's input (after the pre-MLP norm with its affine; for BERT the attention
  block's output).
- ``mlp_in_normalized``: the pre-MLP norm's input normalised *without* its affine (LayerNorm:
  ``(x - mean) / sqrt(var + eps)``; RMSNorm: ``x / sqrt(mean(x^2) + eps)``). This is the input
  convention of TransformerLens-processed models (LayerNorm folded), e.g. the released GPT-2
  transcoders.
- ``mlp_out``: the MLP's output (before dropout / residual add).
- ``mlp_out_centered``: ``mlp_out`` minus its mean over d_model (TransformerLens "centred writing
  weights"; adds nothing a following LayerNorm would not remove).
- ``resid_post``: the block's output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mechfaith.errors import ConfigError

SITES = ("resid_pre", "mlp_in", "mlp_in_normalized", "mlp_out", "mlp_out_centered", "resid_post")
INPUT_SITES = ("mlp_in", "mlp_in_normalized", "resid_pre")
OUTPUT_SITES = ("mlp_out", "mlp_out_centered", "resid_post")
# order in which the sites of one layer fire during a forward pass
_SITE_ORDER = {"resid_pre": 0, "mlp_in_normalized": 1, "mlp_in": 2, "mlp_out": 3,
               "mlp_out_centered": 3, "resid_post": 4}


class UnsupportedModelError(ConfigError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class FamilySpec:
    """Where the parts of one architecture family live (attribute paths, '.'-separated)."""

    name: str
    model_types: tuple[str, ...]  # values of ``model.config.model_type`` this family covers
    base_attrs: tuple[str, ...]  # attribute of the base model inside task heads (e.g. "transformer")
    layers: str  # the ModuleList of blocks, relative to the base model
    mlp_in_module: str  # relative to a block: the module whose (first) input is the MLP input
    mlp_out_module: str  # relative to a block: the module whose output is the MLP output
    mlp_modules: tuple[str, ...]  # modules applied in sequence = the MLP (relative to a block)
    pre_mlp_norm: str  # the norm whose output is the MLP input (relative to a block)
    pre_attn_norm: str | None  # relative to a block (None for post-LN families)
    attention: str  # relative to a block
    embed: str  # token embedding, relative to the base model
    pos_embed: str | None  # learned positional embedding, relative to the base model
    final_norm: str | None  # relative to the base model
    unembed: tuple[str, ...]  # candidate unembedding Linear paths, relative to the full model
    norm_kind: str  # "layernorm" or "rmsnorm"
    mlp_kind: str  # "gelu" (up, act, down) or "gated_silu" (down(silu(gate) * up))
    causal: bool
    post_ln: bool  # the residual is normalised after each sub-block (BERT)


FAMILIES: dict[str, FamilySpec] = {
    "gpt2": FamilySpec(
        name="gpt2", model_types=("gpt2",), base_attrs=("transformer",), layers="h",
        mlp_in_module="mlp", mlp_out_module="mlp", mlp_modules=("mlp",), pre_mlp_norm="ln_2",
        pre_attn_norm="ln_1", attention="attn", embed="wte", pos_embed="wpe", final_norm="ln_f",
        unembed=("lm_head",), norm_kind="layernorm", mlp_kind="gelu", causal=True, post_ln=False),
    "llama": FamilySpec(
        name="llama", model_types=("llama",), base_attrs=("model",), layers="layers",
        mlp_in_module="mlp", mlp_out_module="mlp", mlp_modules=("mlp",),
        pre_mlp_norm="post_attention_layernorm", pre_attn_norm="input_layernorm",
        attention="self_attn", embed="embed_tokens", pos_embed=None, final_norm="norm",
        unembed=("lm_head",), norm_kind="rmsnorm", mlp_kind="gated_silu", causal=True,
        post_ln=False),
    "bert": FamilySpec(
        name="bert", model_types=("bert",), base_attrs=("bert",), layers="encoder.layer",
        mlp_in_module="intermediate", mlp_out_module="output.dense",
        mlp_modules=("intermediate", "output.dense"), pre_mlp_norm="attention.output.LayerNorm",
        pre_attn_norm=None, attention="attention", embed="embeddings.word_embeddings",
        pos_embed="embeddings.position_embeddings", final_norm=None,
        unembed=("cls.predictions.decoder",), norm_kind="layernorm", mlp_kind="gelu",
        causal=False, post_ln=True),
}


def supported_families() -> str:
    """'gpt2 (gpt2), llama (llama), bert (bert)': family names with the model types they cover."""
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())


def family_for(model: nn.Module) -> FamilySpec:
    """The family of a transformers model, from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"model type {model_type!r} ({type(model).__name__}) is not supported; supported "
        f"families: {supported_families()}")


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _first_tensor(value: Any) -> Tensor:
    """The hidden states from a module's output (a tensor, or the first item of a tuple)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"cannot find hidden states in a {type(value).__name__}")


def _input_tensor(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"]
    raise TypeError("cannot find the hidden-states input of a module call")


def layer_norm_normalize(x: Tensor, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the last dim (LayerNorm without affine)."""
    return F.layer_norm(x, (x.shape[-1],), None, None, eps)


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` computed in float32 like Llama's RMSNorm, cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (caught by :func:`ModelAdapter.run`)."""


class ModelAdapter:
    """A transformers model together with its family's module map and hook helpers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.family = family_for(model)
        fam = self.family
        self.base = model
        for attr in fam.base_attrs:
            if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
                self.base = getattr(model, attr)
                break
        try:
            self.layers: nn.ModuleList = _get(self.base, fam.layers)
        except AttributeError:
            raise UnsupportedModelError(f"{type(model).__name__} has no {fam.layers!r} blocks; "
                                        f"expected a standard {fam.name} model") from None
        cfg = model.config
        self.n_layers = len(self.layers)
        self.d_model = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
        self.d_mlp = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                         or 4 * self.d_model)

    # ------------------------------------------------------------------ modules
    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise ConfigError(f"layer {layer!r} is out of range: the model has layers 0..{self.n_layers - 1}")
        return layer

    def block(self, layer: int) -> nn.Module:
        return self.layers[self.check_layer(layer)]

    def mlp_modules(self, layer: int) -> list[nn.Module]:
        """The modules that, applied in order, compute the MLP of ``layer``."""
        blk = self.block(layer)
        return [_get(blk, p) for p in self.family.mlp_modules]

    def mlp(self, layer: int) -> nn.Module:
        """The MLP as one module (for BERT a Sequential view of intermediate + output.dense)."""
        mods = self.mlp_modules(layer)
        return mods[0] if len(mods) == 1 else nn.Sequential(*mods)

    def pre_mlp_norm(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.family.pre_mlp_norm)

    def pre_attn_norm(self, layer: int) -> nn.Module | None:
        p = self.family.pre_attn_norm
        return None if p is None else _get(self.block(layer), p)

    def attention(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.family.attention)

    def embedding(self) -> nn.Embedding:
        return _get(self.base, self.family.embed)

    def positional_embedding(self) -> nn.Embedding | None:
        p = self.family.pos_embed
        return None if p is None else _get(self.base, p)

    def final_norm(self) -> nn.Module | None:
        p = self.family.final_norm
        return None if p is None else _get(self.base, p)

    def unembedding(self) -> nn.Linear | None:
        """The output projection to the vocabulary (None for a bare encoder without LM head)."""
        for p in self.family.unembed:
            try:
                return _get(self.model, p)
            except AttributeError:
                continue
        return None

    @property
    def has_lm_head(self) -> bool:
        return self.unembedding() is not None

    def norm_eps(self, norm: nn.Module) -> float:
        eps = getattr(norm, "eps", None)
        if eps is None:
            eps = getattr(norm, "variance_epsilon", None)
        if eps is None:
            raise ConfigError(f"cannot find the epsilon of {type(norm).__name__}")
        return float(eps)

    def normalize(self, layer: int, x: Tensor) -> Tensor:
        """The pre-MLP norm of ``layer`` applied to ``x`` without its affine."""
        eps = self.norm_eps(self.pre_mlp_norm(layer))
        if self.family.norm_kind == "rmsnorm":
            return rms_normalize(x, eps)
        return layer_norm_normalize(x, eps)

    def norm_affine(self, layer: int, z: Tensor) -> Tensor:
        """The pre-MLP norm's affine map applied to a normalised ``z`` (``w * z (+ b)``)."""
        norm = self.pre_mlp_norm(layer)
        w = norm.weight
        assert isinstance(w, Tensor), f"{type(norm).__name__}.weight is not a tensor"
        b = getattr(norm, "bias", None)
        if self.family.norm_kind == "rmsnorm":
            return w * z.to(w.dtype)
        return z * w + b if b is not None else z * w

    # ------------------------------------------------------------------ the MLP as a function
    def mlp_forward(self, layer: int, x: Tensor) -> Tensor:
        """Run exactly the model's MLP of ``layer`` on ``x`` [..., d_model]. Calls ``forward``
        directly, so hooks on the MLP modules (e.g. an active splice) do not fire."""
        for mod in self.mlp_modules(layer):
            x = mod.forward(x)
        return x

    def mlp_function(self, layer: int, input_site: str = "mlp_in",
                     output_site: str = "mlp_out") -> Callable[[Tensor], Tensor]:
        """A function [batch, d_model] -> [batch, d_model] mapping ``input_site`` to ``output_site``
        through the model's own MLP (the Jacobian-matching reference of a transcoder).

        ``mlp_in_normalized`` inputs get the norm's affine first; ``mlp_out_centered`` outputs are
        centred over d_model. Only the MLP sites are allowed (the residual sites involve attention).
        """
        if input_site not in ("mlp_in", "mlp_in_normalized"):
            raise ConfigError(f"the MLP reference maps an MLP input site (mlp_in or "
                              f"mlp_in_normalized), not {input_site!r}")
        if output_site not in ("mlp_out", "mlp_out_centered"):
            raise ConfigError(f"the MLP reference maps to an MLP output site (mlp_out or "
                              f"mlp_out_centered), not {output_site!r}")
        self.check_layer(layer)

        def reference(x: Tensor) -> Tensor:
            h = self.norm_affine(layer, x) if input_site == "mlp_in_normalized" else x
            y = self.mlp_forward(layer, h)
            if output_site == "mlp_out_centered":
                y = y - y.mean(dim=-1, keepdim=True)
            return y

        return reference

    # ------------------------------------------------------------------ hooks
    def hook_site(self, layer: int, site: str, fn: Callable[[Tensor], None]) -> list[RemovableHandle]:
        """Call ``fn(activation)`` with the activation at ``site`` of ``layer`` during each forward
        pass (read-only: ``fn``'s return value is ignored). Returns the hook handles."""
        if site not in SITES:
            raise ConfigError(f"unknown activation site {site!r}; choose one of {', '.join(SITES)}")
        blk = self.block(layer)
        fam = self.family
        if site == "resid_pre":
            h = blk.register_forward_pre_hook(
                lambda m, args, kwargs: fn(_input_tensor(args, kwargs)), with_kwargs=True)
        elif site == "resid_post":
            h = blk.register_forward_hook(lambda m, args, out: fn(_first_tensor(out)))
        elif site == "mlp_in":
            h = _get(blk, fam.mlp_in_module).register_forward_pre_hook(
                lambda m, args, kwargs: fn(_input_tensor(args, kwargs)), with_kwargs=True)
        elif site == "mlp_in_normalized":
            h = self.pre_mlp_norm(layer).register_forward_pre_hook(
                lambda m, args, kwargs: fn(self.normalize(layer, _input_tensor(args, kwargs))),
                with_kwargs=True)
        elif site == "mlp_out":
            h = _get(blk, fam.mlp_out_module).register_forward_hook(
                lambda m, args, out: fn(_first_tensor(out)))
        else:  # mlp_out_centered
            def centred(m: nn.Module, args: tuple, out: Any) -> None:
                y = _first_tensor(out)
                fn(y - y.mean(dim=-1, keepdim=True))
            h = _get(blk, fam.mlp_out_module).register_forward_hook(centred)
        return [h]

    def replace_mlp_out(self, layer: int, fn: Callable[[Tensor], Tensor]) -> RemovableHandle:
        """Replace the MLP output of ``layer`` by ``fn(mlp_out)`` (same shape) in every forward pass."""
        mod = _get(self.block(layer), self.family.mlp_out_module)

        def hook(m: nn.Module, args: tuple, out: Any) -> Any:
            y = _first_tensor(out)
            new = fn(y)
            if new.shape != y.shape:
                raise ConfigError(f"replacement MLP output of layer {layer} has shape "
                                  f"{tuple(new.shape)}, expected {tuple(y.shape)}")
            new = new.to(y.dtype)
            if isinstance(out, Tensor):
                return new
            return (new, *out[1:])

        return mod.register_forward_hook(hook)

    # ------------------------------------------------------------------ running
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        """The model's forward pass (no KV cache)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self.family.causal:
            kwargs["use_cache"] = False
        return self.model(**kwargs)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [batch, seq, vocab]; a model without an LM head raises :class:`ConfigError`."""
        if not self.has_lm_head:
            raise ConfigError(f"{type(self.model).__name__} has no language-model head "
                              f"(load it with a head, e.g. *ForCausalLM / *ForMaskedLM)")
        out = self.forward(input_ids, attention_mask)
        return out.logits if hasattr(out, "logits") else _first_tensor(out)

    def run_with_cache(self, input_ids: Tensor, sites: Sequence[tuple[int, str]],
                       attention_mask: Tensor | None = None, stop_early: bool = True,
                       detach: bool = True) -> dict[tuple[int, str], Tensor]:
        """Activations at ``sites`` ((layer, site) pairs) for one batch. With ``stop_early`` the
        forward pass ends right after the last requested activation (no logits computed)."""
        sites = [(self.check_layer(int(l)), s) for l, s in sites]
        if not sites:
            raise ConfigError("no activation sites requested")
        cache: dict[tuple[int, str], Tensor] = {}
        wanted = set(sites)

        def make(key: tuple[int, str]) -> Callable[[Tensor], None]:
            def fn(t: Tensor) -> None:
                cache[key] = t.detach() if detach else t
                if stop_early and wanted.issubset(cache):
                    raise StopForward
            return fn

        with hooks_removed_after() as handles:
            for key in dict.fromkeys(sites):
                handles.extend(self.hook_site(key[0], key[1], make(key)))
            try:
                self.forward(input_ids, attention_mask)
            except StopForward:
                pass
        missing = wanted - set(cache)
        if missing:
            raise RuntimeError(f"hooks did not fire for {sorted(missing)}")
        return cache


@contextlib.contextmanager
def hooks_removed_after() -> Iterator[list[RemovableHandle]]:
    """Collect hook handles in the yielded list; all are removed on exit (also on exceptions)."""
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def get_adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """An adapter for ``model`` (or ``model`` itself if it already is one)."""
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)
