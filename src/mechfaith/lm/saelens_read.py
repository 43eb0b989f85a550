"""Reading a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) into a coder that computes
exactly what SAELens computes from it.

The config is first read as SAELens reads it (:func:`saelens_view`): a 6.x config as written, a
flat pre-6.0 config with SAELens's old defaults (``apply_b_dec_to_input`` true when absent,
``hook_point`` for ``hook_name``, TopK from ``activation_fn_str`` / ``activation_fn_kwargs``).
Then every setting that changes the computation is honoured or refused in one line naming it:

- ``apply_b_dec_to_input`` (SAEs): folded into ``b_enc`` (``b_enc - b_dec W_enc``); transcoders
  with it are refused, as SAELens refuses them.
- ``rescale_acts_by_decoder_norm`` (TopK, and BatchTopK checkpoints): the decoder row norms are
  folded into the weights (``W_enc``, ``b_enc`` times the norms, ``W_dec`` divided by them), which
  gives SAELens's latents and outputs.
- ``threshold`` (JumpReLU; ``log_threshold`` of older files) and BatchTopK's ``topk_threshold``
  (SAELens's training checkpoints ``batchtopk`` / ``matryoshka_batchtopk``, read as BatchTopK coders
  whose inference threshold it is, as SAELens saves them for inference).
- ``normalize_activations`` other than "none", ``reshape_activations`` other than "none", a
  ``scaling_factor`` tensor other than ones, a pre-6.0 ``activation_fn`` other than ReLU / TopK:
  refused. Architectures SAELens has and mechfaith lacks are refused naming the architecture and
  listing the ones read (:data:`READ_ARCHITECTURES`).

A ``mechfaith`` entry in ``metadata`` (written by :mod:`mechfaith.lm.saelens_write`) restores our
exact config and sites when it agrees with the file.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_json, read_tensors
from mechfaith.coders.validate import check_fields, check_tensor, check_weights, require_dict
from mechfaith.configs import config_from_dict
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.lm.saelens_format import (
    JUMPRELU_FAMILY,
    READ_ARCHITECTURES,
    REFUSED,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    SKIP_ARCHITECTURES,
    TOPK_FAMILY,
    TRAINING_ARCHITECTURES,
    TRANSCODER_ARCHITECTURES,
    ImportedCoder,
    is_saelens_6,
    parse_hook,
)

log = logging.getLogger(__name__)

# older mechfaith exports of TopK transcoders (SAELens has no such architecture; never written now)
LEGACY_MECHFAITH = {"topk_transcoder": "transcoder", "topk_skip_transcoder": "skip_transcoder"}
PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                "activation_fn_str": "activation_fn"}
CFG_FIELDS = {"architecture": "str|null", "k": "number|null", "activation_fn_str": "str|null",
              "activation_fn": "str|null", "activation_fn_kwargs": "dict|null", "hook_name": "str|null",
              "hook_name_out": "str|null", "hook_point": "str|null", "out_hook_point": "str|null",
              "apply_b_dec_to_input": "bool|null", "metadata": "dict|null", "d_in": "int|null",
              "d_sae": "int|null", "d_out": "int|null"}
META_FIELDS = {"model_name": "str|null", "hook_name": "str|null", "hook_name_out": "str|null"}
META_KEYS = ("model_name", "hook_name", "hook_head_index", "hook_name_out", "hook_head_index_out",
             "prepend_bos", "context_size", "sae_lens_version", "sae_lens_training_version")


def _pre6_view(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    """A flat pre-6.0 config as SAELens 6 reads it (its defaults for what the old config lacks)."""
    view = {PRE6_RENAMES.get(k, k): v for k, v in raw.items()}
    view.setdefault("apply_b_dec_to_input", True)
    view.setdefault("architecture", "standard")
    act = view.get("activation_fn") or "relu"
    found = view.get("activation_fn_kwargs")
    kwargs: dict[str, Any] = found if isinstance(found, dict) else {}
    if act == "topk":
        if kwargs.get("k") is None and view["architecture"] != "topk":
            raise CoderFileError(where, "activation_fn 'topk' without activation_fn_kwargs.k (SAELens 6 "
                                        "would compute ReLU): not supported")
        view["architecture"] = "topk"
        view["k"] = kwargs.get("k", view.get("k"))
    elif act != "relu":
        raise CoderFileError(where, f"activation_fn {act!r} is not supported (SAELens 6 computes ReLU "
                                    f"in its place; mechfaith reads relu and topk)")
    norm = view.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        view["normalize_activations"] = "expected_average_only_in" if norm else "none"
    hook = view.get("hook_name")
    view.setdefault("reshape_activations", "hook_z" if isinstance(hook, str) and "hook_z" in hook else "none")
    meta = {k: view[k] for k in META_KEYS if k in view}
    if isinstance(raw.get("metadata"), dict):  # mechfaith's exports before it wrote sae_lens_version
        meta = {**raw["metadata"], **meta}
    view["metadata"] = meta
    return view


def saelens_view(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    """The config as SAELens 6 reads it: architecture, flags (with SAELens's defaults) and
    ``metadata`` (a dict)."""
    if not is_saelens_6(raw):
        view = _pre6_view(raw, where)
    else:
        view = dict(raw)
        view["metadata"] = dict(raw["metadata"]) if isinstance(raw.get("metadata"), dict) else {}
        view.setdefault("apply_b_dec_to_input", True)  # SAELens's SAEConfig default
    view.setdefault("architecture", "standard")
    view.setdefault("normalize_activations", "none")
    view.setdefault("reshape_activations", "none")
    arch = view["architecture"]
    if arch in TOPK_FAMILY:  # SAELens's defaults: the inference TopK config, else the training ones
        view.setdefault("rescale_acts_by_decoder_norm", arch != "topk")
        view.setdefault("k", 100)
    return view


def _check_flags(view: dict[str, Any], where: Path) -> None:
    """Refuse, in one line naming it, an architecture or a setting mechfaith cannot compute exactly."""
    arch = view["architecture"]
    read = ", ".join(READ_ARCHITECTURES)
    if arch in REFUSED:
        raise CoderFileError(where, f"SAELens architecture {arch!r} is not supported: {REFUSED[arch]}; "
                                    f"mechfaith reads {read}")
    if arch not in READ_ARCHITECTURES and arch not in LEGACY_MECHFAITH:
        raise CoderFileError(where, f"unknown SAELens architecture {arch!r}; mechfaith reads {read}")
    if view["normalize_activations"] not in ("none", None):
        raise CoderFileError(where, f"normalize_activations = {view['normalize_activations']!r} is not "
                                    f"supported (only 'none'; fold the normalisation into the weights first)")
    if view["reshape_activations"] not in ("none", None):
        raise CoderFileError(where, f"reshape_activations = {view['reshape_activations']!r} is not supported "
                                    f"(only 'none': mechfaith coders read flat activations)")
    if arch in TRANSCODER_ARCHITECTURES and view["apply_b_dec_to_input"]:
        raise CoderFileError(where, "apply_b_dec_to_input is true for a transcoder (SAELens refuses "
                                    "this too: b_dec lives in the output space)")
    if arch in TOPK_FAMILY or arch in LEGACY_MECHFAITH:
        k = view.get("k")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not float(k).is_integer() or k < 1:
            raise CoderFileError(where, f"k = {k!r} is not a positive whole number")


def _expected_tensors(arch: str) -> set[str]:
    names = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if arch in SKIP_ARCHITECTURES or arch == "topk_skip_transcoder":
        names.add("W_skip")
    if arch in TRAINING_ARCHITECTURES:
        names.add("topk_threshold")
    return names


def _check_tensors(arch: str, tensors: dict[str, Tensor], where: Path) -> None:
    names = set(tensors)
    if "log_threshold" in names and "threshold" not in names:
        names = (names - {"log_threshold"}) | {"threshold"}
    if "scaling_factor" in names:
        if not torch.all(tensors["scaling_factor"] == 1):
            raise CoderFileError(where, "tensor scaling_factor (finetuning_scaling_factor) other than ones "
                                        "is not supported")
        names.discard("scaling_factor")
    expected = _expected_tensors(arch) | ({"threshold"} if arch in JUMPRELU_FAMILY else set())
    if expected - names:
        raise CoderFileError(where, f"tensor(s) {', '.join(sorted(expected - names))} missing for "
                                    f"architecture {arch!r}")
    if names - expected:
        raise CoderFileError(where, f"unexpected tensor(s) {', '.join(sorted(names - expected))} for "
                                    f"architecture {arch!r}")


def _check_shapes(view: dict[str, Any], t: dict[str, Tensor], where: Path) -> None:
    W_enc, W_dec = t["W_enc"], t["W_dec"]
    if W_enc.ndim != 2 or W_dec.ndim != 2:
        raise CoderFileError(where, f"W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} must be 2-D")
    (d_in, n), d_out = W_enc.shape, W_dec.shape[1]
    want = {"W_dec": (n, d_out), "b_enc": (n,), "b_dec": (d_out,), "W_skip": (d_out, d_in),
            "threshold": (n,), "log_threshold": (n,), "topk_threshold": ()}
    for name, shape in want.items():
        if name in t and tuple(t[name].shape) != shape:
            raise CoderFileError(where, f"tensor {name} has shape {tuple(t[name].shape)}, expected {shape}")
    for key, value in (("d_in", d_in), ("d_sae", n)) + ((("d_out", d_out),) if "d_out" in view else ()):
        if view.get(key) is not None and view[key] != value:
            raise CoderFileError(where, f"cfg.json says {key} = {view[key]!r}, the weights have {value}")
    if view["architecture"] not in TRANSCODER_ARCHITECTURES and view["architecture"] not in LEGACY_MECHFAITH \
            and d_out != d_in:
        raise CoderFileError(where, f"an SAE ({view['architecture']!r}) with d_out {d_out} != d_in {d_in}")


def saelens_state(view: dict[str, Any], t: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens's tensors with its flags folded in, under mechfaith's names and orientations (float32)."""
    arch = view["architecture"]
    W_enc, b_enc, W_dec, b_dec = (t[k].double() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if view["apply_b_dec_to_input"] and arch not in TRANSCODER_ARCHITECTURES:
        b_enc = b_enc - b_dec @ W_enc  # SAELens encodes x - b_dec
    if arch in TOPK_FAMILY and view["rescale_acts_by_decoder_norm"]:
        norms = W_dec.norm(dim=-1)  # SAELens: latents = topk(pre * norms), decoded as latents / norms
        W_enc, b_enc = W_enc * norms, b_enc * norms
        W_dec = torch.where(norms[:, None] > 0, W_dec / norms.clamp_min(1e-300)[:, None], 0.0)
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if "W_skip" in t:
        state["W_skip"] = t["W_skip"].double().T.contiguous()
    if "threshold" in t:
        state["threshold"] = t["threshold"].double()
    elif "log_threshold" in t:
        state["threshold"] = t["log_threshold"].double().exp()
    if "topk_threshold" in t:
        state["topk_threshold"] = t["topk_threshold"].double()
    return {k: v.float().contiguous() for k, v in state.items()}


def _derived_config(view: dict[str, Any], state: dict[str, Tensor], where: Path) -> CoderConfig:
    arch = view["architecture"]
    if arch in TRAINING_ARCHITECTURES:
        activation = "batchtopk"
    elif arch in JUMPRELU_FAMILY:
        activation = "jumprelu"
    elif arch == "topk" or arch in LEGACY_MECHFAITH:
        activation = "topk"
    else:
        activation = "relu"
    transcoder = arch in TRANSCODER_ARCHITECTURES or arch in LEGACY_MECHFAITH
    d_in, n = state["W_enc"].shape
    k = int(view["k"]) if activation in ("topk", "batchtopk") else 32
    try:
        return CoderConfig(d_in=d_in, n_latents=n, d_out=state["W_dec"].shape[1],
                           kind="transcoder" if transcoder else "sae", activation=activation,
                           k=min(k, n) if activation == "batchtopk" else k, skip="W_skip" in state)
    except ConfigError as exc:
        raise CoderFileError(where, str(exc)) from None


def _our_config(meta: dict[str, Any], derived: CoderConfig, state: dict[str, Tensor]) -> CoderConfig | None:
    """The config of the ``mechfaith`` metadata entry when it agrees with the file, else None."""
    ours = meta.get("mechfaith")
    if not isinstance(ours, dict):
        return None
    try:
        cfg = config_from_dict(CoderConfig, ours.get("config"))  # type: ignore[arg-type]
    except ConfigError:
        log.warning("ignoring the mechfaith entry of a SAELens config: not a valid coder config")
        return None
    same = [(cfg.d_in, cfg.n_latents, cfg.d_out, cfg.skip) == (derived.d_in, derived.n_latents, derived.d_out,
                                                                derived.skip),
            cfg.kind == derived.kind or cfg.d_out == cfg.d_in,
            cfg.activation == derived.activation or (cfg.activation == "batchtopk" and derived.activation
                                                     == "jumprelu" and _constant(state["threshold"])),
            cfg.activation != "topk" or cfg.k == derived.k]
    if not all(same):
        log.warning("ignoring the mechfaith entry of a SAELens config: it disagrees with the file")
        return None
    return cfg


def _constant(t: Tensor) -> bool:
    return bool(t.numel() > 0 and torch.all(t == t.reshape(-1)[0]))


def _load(cfg: CoderConfig, state: dict[str, Tensor]) -> SparseCoder:
    coder = SparseCoder(cfg)
    sd = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.skip:
        sd["W_skip"] = state["W_skip"]
    sd["batchtopk_threshold"] = coder.batchtopk_threshold.detach().clone()
    if cfg.activation == "jumprelu":
        sd["log_threshold"] = state["threshold"].clamp_min(1e-30).log()
    elif cfg.activation == "batchtopk":
        theta = state["topk_threshold"] if "topk_threshold" in state else state["threshold"].reshape(-1)[0]
        sd["batchtopk_threshold"] = theta.reshape(()).clone()
    coder.load_state_dict(sd)
    return coder.eval()


def import_saelens(folder: str | os.PathLike[str]) -> ImportedCoder:
    """Read a SAELens folder into a :class:`SparseCoder` computing what SAELens computes (see the
    module docstring); a :class:`CoderFileError` naming what is refused otherwise."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    cfg_path, weights_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    if not cfg_path.is_file():
        raise CoderFileError(folder, f"no {SAELENS_CFG}: not a SAELens folder")
    raw = require_dict(cfg_path, read_json(cfg_path))
    check_fields(cfg_path, raw, CFG_FIELDS)
    if isinstance(raw.get("metadata"), dict):
        check_fields(cfg_path, raw["metadata"], META_FIELDS)
    view = saelens_view(raw, cfg_path)
    _check_flags(view, cfg_path)
    tensors = read_tensors(weights_path, weights=False)
    # every weight under the one dtype policy, except BatchTopK's scalar topk_threshold: SAELens keeps
    # it as a float64 running mean, and it is rounded to float32 (the coder's dtype) on purpose
    check_weights(weights_path, {k: v for k, v in tensors.items() if k != "topk_threshold"})
    if "topk_threshold" in tensors:
        t = check_tensor(weights_path, "topk_threshold", tensors["topk_threshold"], rank=0, floating=False)
        if not t.is_floating_point():
            raise CoderFileError(weights_path, f"tensor topk_threshold has dtype {t.dtype}, expected floating point")
    _check_tensors(view["architecture"], tensors, weights_path)
    _check_shapes(view, tensors, weights_path)
    if "threshold" in tensors:  # SAELens's JumpReLU thresholds; a negative one would be clamped silently
        check_tensor(weights_path, "threshold", tensors["threshold"], min_value=0.0)
    state = saelens_state(view, tensors)
    if not all(math.isfinite(float(v.abs().max())) for v in state.values() if v.numel()):
        raise CoderFileError(weights_path, "the weights hold NaN or infinite values")
    derived = _derived_config(view, state, cfg_path)
    meta = view["metadata"]
    cfg = _our_config(meta, derived, state) or derived
    ours = meta.get("mechfaith") if cfg is not derived else None
    if isinstance(ours, dict):
        layer, input_site, output_site = ours.get("layer"), ours.get("input_site"), ours.get("output_site")
    else:
        layer, input_site = parse_hook(meta.get("hook_name"))
        output_site = parse_hook(meta.get("hook_name_out"))[1] if cfg.kind == "transcoder" else input_site
    model = meta.get("model_name")
    return ImportedCoder(_load(cfg, state), layer, input_site, output_site, raw,
                         model if isinstance(model, str) and model else None)
