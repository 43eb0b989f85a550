"""circuit-tracer's (safety-research) per-layer transcoder sets, both ways.

A set is a folder of ``layer_<i>.safetensors`` files, one per layer from 0 to the last (circuit-tracer
requires every layer), and a ``config.yaml`` (its ``load_transcoders``): ``model_kind``
"transcoder_set", ``model_name``, ``feature_input_hook`` / ``feature_output_hook`` (TransformerLens
hook names inside a block: ``mlp.hook_in`` / ``mlp.hook_out``, ``ln2.hook_normalized``,
``hook_mlp_out``...), ``scan`` (a name for the set's feature visualisations) and ``transcoders``
(the layer files in order; circuit-tracer opens a local path as given, relative to the current
folder; mechfaith resolves a relative one against the set folder and refuses ``hf://`` ones).

Each layer file (``SingleLayerTranscoder.to_safetensors``): ``W_enc`` [d_transcoder, d_model]
(applied as ``x W_enc^T + b_enc``: the transpose of mechfaith's), ``b_enc``, ``W_dec``
[d_transcoder, d_model], ``b_dec``, optionally ``activation_function.threshold`` [d_transcoder]
(JumpReLU ``pre * (pre > threshold)``; ReLU without it) and ``W_skip`` [d_model, d_model]
(added as ``x W_skip^T``). Nothing is subtracted from the input. ``load_relu_transcoder`` reads no
``k``: TopK coders cannot be written; a BatchTopK coder at inference is a JumpReLU with its
threshold on every latent and is written as one. Thresholds must be positive to be read
(mechfaith keeps their logarithm); the output must have the input's width (``d_model``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from mechfaith.atomic import atomic_dir, check_replaceable
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_tensors, write_tensors
from mechfaith.coders.validate import check_fields, check_tensor, require_dict
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.lm.saelens_format import ImportedCoder

CT_CONFIG = "config.yaml"
LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")
THRESHOLD = "activation_function.threshold"
INPUT_HOOKS = {"mlp.hook_in": "mlp_in", "ln2.hook_normalized": "mlp_in_normalized", "hook_resid_mid": "resid_mid"}
OUTPUT_HOOKS = {"mlp.hook_out": "mlp_out", "hook_mlp_out": "mlp_out"}
SITE_HOOKS = {"mlp_in": "mlp.hook_in", "mlp_in_normalized": "ln2.hook_normalized", "mlp_out": "mlp.hook_out",
              "mlp_out_centered": "mlp.hook_out"}


@dataclass
class CircuitTracerSet:
    """A circuit-tracer set read as coders, with its configuration."""

    coders: dict[int, ImportedCoder]
    model_name: str | None
    feature_input_hook: str | None
    feature_output_hook: str | None
    scan: str | None
    config: dict[str, Any] = field(default_factory=dict)


def is_circuit_tracer_set(path: str | Path) -> bool:
    """Whether ``path`` is a folder with circuit-tracer's ``config.yaml`` or its ``layer_0.safetensors``."""
    p = Path(path)
    return p.is_dir() and ((p / CT_CONFIG).is_file() or (p / "layer_0.safetensors").is_file())


KINDS = {"transcoder_set": "per-layer transcoder sets", "cross_layer_transcoder": "cross-layer transcoders"}


def read_config(folder: Path, kind: str = "transcoder_set") -> dict[str, Any]:
    """``config.yaml`` checked (empty when absent); its ``model_kind`` (when given) must be ``kind``."""
    path = folder / CT_CONFIG
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CoderFileError(path, f"not readable YAML ({str(exc).splitlines()[0]})") from None
    data = require_dict(path, data, "a YAML mapping")
    check_fields(path, data, {"model_kind": "str", "model_name": "str|null", "feature_input_hook": "str",
                              "feature_output_hook": "str", "scan": "str|list|null", "transcoders": "list"})
    found = data.get("model_kind", kind)
    if found != kind:
        raise CoderFileError(path, f"model_kind {found!r} is not supported by this reader: it reads {KINDS[kind]} "
                                   f"(model_kind {kind})")
    return data


def layer_files(folder: Path, config: dict[str, Any]) -> dict[int, Path]:
    """Each layer's file: ``transcoders`` in order, else the folder's ``layer_<i>.safetensors``."""
    where = folder / CT_CONFIG
    if "transcoders" in config:
        files = {}
        for i, entry in enumerate(config["transcoders"]):
            if not isinstance(entry, str):
                raise CoderFileError(where, f"transcoders[{i}] is not a path")
            if entry.startswith("hf://"):
                raise CoderFileError(where, f"transcoders[{i}] {entry!r} is on the Hugging Face Hub: mechfaith "
                                            "reads local files only (download the set first)")
            p = Path(entry)
            files[i] = p if p.is_absolute() else folder / p
    else:
        found = {int(m.group(1)): c for c in folder.iterdir() if (m := LAYER_FILE.fullmatch(c.name))}
        files = dict(sorted(found.items()))
    if not files:
        raise CoderFileError(folder, "no layer_<i>.safetensors files: not a circuit-tracer set")
    if sorted(files) != list(range(len(files))):
        raise CoderFileError(folder, f"layers {sorted(files)}: circuit-tracer needs one transcoder for every "
                                     "layer from 0")
    return files


def read_layer(path: Path, layer: int, input_site: str | None, output_site: str | None,
               model_name: str | None) -> ImportedCoder:
    """One ``layer_<i>.safetensors`` as a coder computing what circuit-tracer computes."""
    t = read_tensors(path)
    w = t.get("W_enc")
    n, d = tuple(w.shape) if isinstance(w, Tensor) and w.dim() == 2 else (0, 0)
    want: dict[str, tuple[int, ...]] = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    optional: dict[str, tuple[int, ...]] = {THRESHOLD: (n,), "W_skip": (d, d)}
    want.update({name: shape for name, shape in optional.items() if name in t})
    extra = sorted(set(t) - set(want))
    missing = sorted(set(want) - set(t))
    if missing or extra:
        what = [f"missing {', '.join(missing)}"] * bool(missing) + [f"unexpected {', '.join(extra)}"] * bool(extra)
        raise CoderFileError(path, f"tensor(s) {'; '.join(what)} (circuit-tracer writes W_enc, b_enc, W_dec, "
                                   f"b_dec, optionally {THRESHOLD} and W_skip)")
    for name, shape in want.items():
        check_tensor(path, name, t[name], shape=shape)
    jump = THRESHOLD in t
    if jump and bool((t[THRESHOLD] <= 0).any()):
        raise CoderFileError(path, f"JumpReLU threshold {float(t[THRESHOLD].min()):.3g} is not positive "
                                   "(mechfaith keeps each threshold's logarithm)")
    cfg = CoderConfig(d_in=d, n_latents=n, d_out=d, kind="transcoder", activation="jumprelu" if jump else "relu",
                      skip="W_skip" in t, decoder_norm="penalty")
    state = {"W_enc": t["W_enc"].float().T, "b_enc": t["b_enc"].float(), "W_dec": t["W_dec"].float(),
             "b_dec": t["b_dec"].float()}
    if jump:
        state["log_threshold"] = t[THRESHOLD].double().log().float()
    if "W_skip" in t:
        state["W_skip"] = t["W_skip"].float().T
    coder = SparseCoder(cfg)
    state["batchtopk_threshold"] = coder.batchtopk_threshold.detach().clone()
    coder.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return ImportedCoder(coder.eval(), layer, input_site, output_site, {"file": path.name}, model_name)


def read_circuit_tracer_set(path: str | os.PathLike[str]) -> CircuitTracerSet:
    """A circuit-tracer set folder (or its ``config.yaml``) as one coder per layer (module docstring)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    config = read_config(folder)
    files = layer_files(folder, config)
    in_hook, out_hook = config.get("feature_input_hook"), config.get("feature_output_hook")
    model = config.get("model_name")
    coders = {l: read_layer(p, l, INPUT_HOOKS.get(in_hook or ""), OUTPUT_HOOKS.get(out_hook or ""), model)
              for l, p in files.items()}
    widths = {(c.coder.d_in, c.coder.n_latents) for c in coders.values()}
    if len(widths) > 1:
        raise CoderFileError(folder, f"layers of different sizes {sorted(widths)}: circuit-tracer needs one "
                                     "d_transcoder for the set")
    scan = config.get("scan")
    return CircuitTracerSet(coders, model, in_hook, out_hook, scan if isinstance(scan, str) else None, config)


def layer_tensors(coder: SparseCoder, layer: int) -> dict[str, Tensor]:
    """A coder as circuit-tracer's layer file; a :class:`ConfigError` for what it cannot hold."""
    cfg = coder.cfg
    what = f"layer {layer}: a {cfg.activation} {cfg.kind}"
    if cfg.kind != "transcoder":
        raise ConfigError(f"{what}: a circuit-tracer set holds transcoders (each replaces its layer's MLP); "
                          "nothing written")
    if cfg.activation == "topk":
        raise ConfigError(f"{what}: circuit-tracer's per-layer loader reads ReLU and JumpReLU transcoders (no k); "
                          "nothing written")
    if cfg.d_out != cfg.d_in:
        raise ConfigError(f"{what} maps {cfg.d_in} to {cfg.d_out} dimensions: circuit-tracer's output has the "
                          "input's width; nothing written")
    with torch.no_grad():
        t = {"W_enc": coder.W_enc.T, "W_dec": coder.W_dec, "b_enc": coder.b_enc, "b_dec": coder.b_dec}
        if cfg.activation == "jumprelu":
            t[THRESHOLD] = coder.threshold()
        elif cfg.activation == "batchtopk":
            thr = float(coder.batchtopk_threshold)
            if thr < 0:
                raise ConfigError(f"{what} without an inference threshold (never estimated): nothing written")
            t[THRESHOLD] = torch.full((cfg.n_latents,), thr)
        if coder.W_skip is not None:
            t["W_skip"] = coder.W_skip.T
        return {k: v.detach().float().cpu().contiguous() for k, v in t.items()}


def export_circuit_tracer_set(coders: dict[int, SparseCoder], out: str | os.PathLike[str], *,
                              model_name: str | None = None, input_site: str | None = "mlp_in",
                              output_site: str | None = "mlp_out", scan: str | None = None) -> dict[int, Path]:
    """Write ``coders`` (layers 0..L) as a circuit-tracer set in ``out``: ``layer_<i>.safetensors`` and
    ``config.yaml``; all or nothing, refused before writing when circuit-tracer cannot load it."""
    out = Path(out)
    if sorted(coders) != list(range(len(coders))) or not coders:
        raise ConfigError(f"layers {sorted(coders)}: a circuit-tracer set needs a transcoder for every layer from 0 "
                          "(its TranscoderSet); nothing written")
    files = {l: layer_tensors(c, l) for l, c in coders.items()}
    if len({c.n_latents for c in coders.values()}) > 1 or len({c.cfg.skip for c in coders.values()}) > 1:
        raise ConfigError("circuit-tracer needs one d_transcoder and the same skip connection at every layer; "
                          "nothing written")
    hooks = (SITE_HOOKS.get(str(input_site)), SITE_HOOKS.get(str(output_site)))
    if None in hooks:
        raise ConfigError(f"circuit-tracer has no hook for {input_site} -> {output_site} (mechfaith writes "
                          f"{', '.join(SITE_HOOKS)}); nothing written")
    names = {l: f"layer_{l}.safetensors" for l in files}
    config = {"model_name": model_name, "model_kind": "transcoder_set", "feature_input_hook": hooks[0],
              "feature_output_hook": hooks[1], "scan": scan or f"mechfaith/{model_name or 'model'}",
              "transcoders": [str(out.resolve() / names[l]) for l in sorted(files)]}
    check_replaceable(out, (CT_CONFIG, *names.values()), "circuit-tracer set")
    with atomic_dir(out) as tmp:
        for l, t in files.items():
            write_tensors(tmp / names[l], t)
        (tmp / CT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {l: out / n for l, n in names.items()}


def import_circuit_tracer_layer(path: str | os.PathLike[str]) -> ImportedCoder:
    """One layer file of a circuit-tracer set as a coder, its layer and sites from the set's
    ``config.yaml`` (the file's place in ``transcoders``, else its name)."""
    path = Path(path)
    folder = path.parent
    config = read_config(folder)
    files = {p.resolve(): l for l, p in layer_files(folder, config).items()} if config else {}
    m = LAYER_FILE.fullmatch(path.name)
    layer = files.get(path.resolve(), int(m.group(1)) if m else None)
    if layer is None:
        raise CoderFileError(path, "not a layer of this circuit-tracer set (not in config.yaml's transcoders)")
    in_hook, out_hook = config.get("feature_input_hook"), config.get("feature_output_hook")
    return read_layer(path, layer, INPUT_HOOKS.get(in_hook or ""), OUTPUT_HOOKS.get(out_hook or ""),
                      config.get("model_name"))
