"""circuit-tracer's (safety-research) cross-layer transcoder files, both ways.

A CLT is a folder of two files per layer ``i`` from 0 to ``L - 1`` (``CrossLayerTranscoder.to_safetensors``
writes them, ``load_clt`` reads them and takes ``L`` from the number of ``W_enc_<i>`` files)::

    W_enc_<i>.safetensors   W_enc_<i> [n, d]  b_enc_<i> [n]  b_dec_<i> [d]  threshold_<i> [n] (JumpReLU only)
    W_dec_<i>.safetensors   W_dec_<i> [n, L - i, d]   (layer i's latents to the outputs of layers i .. L-1)

with ``pre_i = x_i W_enc_i^T + b_enc_i``, ``f_i = pre_i * (pre_i > threshold_i)`` (ReLU without
thresholds) and ``y_t = b_dec_t + sum_{i <= t} f_i W_dec_i[:, t - i]``; input and output have the same
width ``d`` (d_model); every latent writes to every later layer; layer ``i`` is the model's layer
``i``. On the Hub the folder also holds a ``config.yaml`` (``model_kind: cross_layer_transcoder``,
``model_name``, ``feature_input_hook``, ``feature_output_hook``, ``scan``), which circuit-tracer itself
writes only into its transcoder cache.

Mapping to :class:`~mechfaith.coders.clt.CrossLayerTranscoder`: ``W_enc`` is transposed, the decoders
are the same arrays, ``log_threshold = log(threshold)`` (computed in float64). What circuit-tracer
cannot hold is refused before anything is written: TopK CLTs (it has ReLU and JumpReLU only), a skip
connection (its class has ``W_skip`` in memory, but ``to_safetensors`` does not write it and
``load_clt`` does not read it), ``d_out != d_in``, and a block that does not start at layer 0
(circuit-tracer's replacement model needs every layer of the model; a block ``[0, L)`` of a deeper
model is written, loads with ``load_clt``, and is the caller's to match to the model). A CLT
of limited ``reach`` is written exactly with zero decoders beyond its reach, and ``mechfaith_reach``
in ``config.yaml`` lets mechfaith read it back as that CLT (those decoders checked to be zero).

mechfaith also writes ``log_threshold_<i>`` beside ``threshold_<i>`` (circuit-tracer reads tensors by
name and ignores it), so that its own CLTs reload bit for bit; a threshold written by anything else
is read as its logarithm, and written back can differ from it by float32 rounding (relative
~ |log t| 6e-8).
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
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.coders.files import read_tensors, write_tensors
from mechfaith.coders.validate import check_tensor
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.lm.circuit_tracer import CT_CONFIG, INPUT_HOOKS, OUTPUT_HOOKS, SITE_HOOKS, read_config

CLT_KIND = "cross_layer_transcoder"
ENC_FILE = re.compile(r"W_enc_(\d+)\.safetensors")
DEC_FILE = re.compile(r"W_dec_(\d+)\.safetensors")
REACH = "mechfaith_reach"  # config.yaml: the reach of a mechfaith CLT written with zero decoders beyond it
OWN_FILES = (CT_CONFIG, "W_enc_*.safetensors", "W_dec_*.safetensors")
# mechfaith site -> circuit-tracer hook (its CLTs' defaults: hook_resid_mid -> hook_mlp_out)
HOOKS = {**SITE_HOOKS, "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out"}


@dataclass
class CircuitTracerCLT:
    """A circuit-tracer CLT read as a mechfaith one, with its configuration."""

    clt: CrossLayerTranscoder
    model_name: str | None
    feature_input_hook: str | None
    feature_output_hook: str | None
    scan: str | None
    input_site: str | None  # mechfaith's name of feature_input_hook (None: unknown)
    output_site: str | None
    config: dict[str, Any] = field(default_factory=dict)


def _peek_kind(path: Path) -> str | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    kind = data.get("model_kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def is_circuit_tracer_clt(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding ``W_enc_0.safetensors`` or a ``config.yaml`` of model_kind
    cross_layer_transcoder."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / CT_CONFIG).is_file():
        return _peek_kind(p / CT_CONFIG) == CLT_KIND
    return (p / "W_enc_0.safetensors").is_file()


def _layer_files(folder: Path) -> int:
    """The number of layers: ``W_enc_<i>`` and ``W_dec_<i>`` files for every i from 0, nothing else."""
    enc = sorted(int(m.group(1)) for c in folder.iterdir() if (m := ENC_FILE.fullmatch(c.name)))
    dec = sorted(int(m.group(1)) for c in folder.iterdir() if (m := DEC_FILE.fullmatch(c.name)))
    if not enc:
        raise CoderFileError(folder, "no W_enc_<i>.safetensors files: not a circuit-tracer cross-layer transcoder")
    if enc != list(range(len(enc))):
        raise CoderFileError(folder, f"encoder layers {enc}: circuit-tracer needs W_enc_<i>.safetensors for every "
                                     "layer from 0")
    if dec != enc:
        missing, extra = sorted(set(enc) - set(dec)), sorted(set(dec) - set(enc))
        what = [f"missing for layers {missing}"] * bool(missing) + [f"without an encoder: {extra}"] * bool(extra)
        raise CoderFileError(folder, f"W_dec_<i>.safetensors {'; '.join(what)}")
    return len(enc)


def _check_names(path: Path, t: dict[str, Tensor], want: set[str], allowed: set[str]) -> None:
    missing, extra = sorted(want - set(t)), sorted(set(t) - want - allowed)
    if missing or extra:
        what = [f"missing {', '.join(missing)}"] * bool(missing) + [f"unexpected {', '.join(extra)}"] * bool(extra)
        raise CoderFileError(path, f"tensor(s) {'; '.join(what)}")


def _read_encoder(path: Path, i: int, n: int, d: int, jump: bool) -> dict[str, Tensor]:
    """Layer ``i``'s encoder file, checked; its tensors named without the layer."""
    t = read_tensors(path)
    shapes = {f"W_enc_{i}": (n, d), f"b_enc_{i}": (n,), f"b_dec_{i}": (d,)}
    if jump:
        shapes[f"threshold_{i}"] = (n,)
    _check_names(path, t, set(shapes), {f"log_threshold_{i}"} if jump else set())
    if f"log_threshold_{i}" in t:
        shapes[f"log_threshold_{i}"] = (n,)
    for name, shape in shapes.items():
        check_tensor(path, name, t[name], shape=shape)
    out = {name.rsplit("_", 1)[0]: t[name].float() for name in shapes}
    if jump:
        thr = out["threshold"]
        if bool((thr <= 0).any()):
            raise CoderFileError(path, f"JumpReLU threshold {float(thr.min()):.3g} is not positive (mechfaith keeps "
                                       "each threshold's logarithm)")
        if "log_threshold" not in out:
            out["log_threshold"] = t[f"threshold_{i}"].double().log().float()
        elif not torch.allclose(out["log_threshold"].exp(), thr, rtol=1e-6, atol=0):
            raise CoderFileError(path, f"log_threshold_{i} and threshold_{i} disagree (edited by another tool?)")
    return out


def _read_decoder(path: Path, i: int, n: int, L: int, d: int, reach: int | None) -> Tensor:
    t = read_tensors(path)
    _check_names(path, t, {f"W_dec_{i}"}, set())
    w = check_tensor(path, f"W_dec_{i}", t[f"W_dec_{i}"], shape=(n, L - i, d)).float()
    if reach is not None:
        if bool(w[:, reach + 1:].ne(0).any()):
            raise CoderFileError(path, f"W_dec_{i} writes beyond {REACH} = {reach} in config.yaml")
        w = w[:, :reach + 1]
    return w.contiguous()


def _config_reach(folder: Path, config: dict[str, Any]) -> int | None:
    reach = config.get(REACH)
    if reach is not None and (not isinstance(reach, int) or isinstance(reach, bool) or reach < 0):
        raise CoderFileError(folder / CT_CONFIG, f"{REACH} must be an integer >= 0, got {reach!r:.40}")
    return reach


def read_circuit_tracer_clt(path: str | os.PathLike[str]) -> CircuitTracerCLT:
    """A circuit-tracer CLT folder (or one of its files) as a mechfaith CLT (module docstring)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    config = read_config(folder, CLT_KIND)
    L = _layer_files(folder)
    first = read_tensors(folder / "W_enc_0.safetensors")
    w0 = first.get("W_enc_0")
    n, d = tuple(w0.shape) if isinstance(w0, Tensor) and w0.dim() == 2 else (0, 0)
    if not n:
        raise CoderFileError(folder / "W_enc_0.safetensors", "no 2-dimensional W_enc_0 [d_transcoder, d_model]")
    jump = "threshold_0" in first
    reach = _config_reach(folder, config)
    enc = [_read_encoder(folder / f"W_enc_{i}.safetensors", i, n, d, jump) for i in range(L)]
    cfg = CLTConfig(n_layers=L, d_in=d, n_latents=n, d_out=d, reach=reach,
                    activation="jumprelu" if jump else "relu")
    state = {"W_enc": torch.stack([e["W_enc"].T for e in enc]), "b_enc": torch.stack([e["b_enc"] for e in enc]),
             "b_dec": torch.stack([e["b_dec"] for e in enc])}
    for i in range(L):
        state[f"W_dec_{i}"] = _read_decoder(folder / f"W_dec_{i}.safetensors", i, n, L, d, reach)
    if jump:
        state["log_threshold"] = torch.stack([e["log_threshold"] for e in enc])
    clt = CrossLayerTranscoder(cfg)
    clt.load_state_dict({k: v.contiguous() for k, v in state.items()})
    in_hook, out_hook = config.get("feature_input_hook"), config.get("feature_output_hook")
    scan = config.get("scan")
    return CircuitTracerCLT(clt.eval(), config.get("model_name"), in_hook, out_hook,
                            scan if isinstance(scan, str) else None, INPUT_HOOKS.get(in_hook or ""),
                            OUTPUT_HOOKS.get(out_hook or ""), config)


def check_writable(clt: CrossLayerTranscoder) -> None:
    """A :class:`ConfigError` (one line) for a CLT circuit-tracer's files cannot hold."""
    cfg = clt.cfg
    what = f"a {cfg.activation} CLT" + (" with a skip" if cfg.skip else "")
    if cfg.activation not in ("relu", "jumprelu"):
        raise ConfigError(f"{what}: circuit-tracer's CLT has ReLU and JumpReLU latents only (no k); nothing written")
    if cfg.skip:
        raise ConfigError(f"{what}: circuit-tracer's CLT files hold no skip connection (its to_safetensors does not "
                          "write W_skip and load_clt does not read it); nothing written")
    if cfg.d_out != cfg.d_in:
        raise ConfigError(f"{what} maps {cfg.d_in} to {cfg.d_out} dimensions: circuit-tracer's output has the "
                          "input's width; nothing written")
    if cfg.first_layer != 0:
        raise ConfigError(f"{what} over layers {cfg.first_layer}..{cfg.first_layer + cfg.n_layers - 1}: circuit-tracer "
                          "reads W_enc_<i> as the model's layer i, from 0; nothing written")


@torch.no_grad()
def clt_tensors(clt: CrossLayerTranscoder) -> dict[str, dict[str, Tensor]]:
    """Each file's tensors (float32, on the CPU), by file name; decoders padded with zeros to every
    later layer."""
    check_writable(clt)
    L, n, d = clt.n_layers, clt.n_latents, clt.d_out
    files: dict[str, dict[str, Tensor]] = {}
    thr = clt.threshold() if clt.log_threshold is not None else None
    for i in range(L):
        enc = {f"W_enc_{i}": clt.W_enc[i].T, f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
        if thr is not None and clt.log_threshold is not None:
            enc[f"threshold_{i}"] = thr[i]
            enc[f"log_threshold_{i}"] = clt.log_threshold[i]
        w = clt.W_dec(i)
        full = torch.zeros(n, L - i, d, dtype=w.dtype, device=w.device)
        full[:, :w.shape[1]] = w
        files[f"W_enc_{i}.safetensors"] = enc
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": full}
    return {f: {k: v.detach().float().cpu().contiguous() for k, v in t.items()} for f, t in files.items()}


def export_circuit_tracer_clt(clt: CrossLayerTranscoder, out: str | os.PathLike[str], *,
                              model_name: str | None = None, input_site: str | None = "mlp_in",
                              output_site: str | None = "mlp_out", scan: str | None = None) -> Path:
    """Write ``clt`` in circuit-tracer's layout in ``out`` (its ``W_enc_<i>`` / ``W_dec_<i>`` files and a
    ``config.yaml``), all or nothing; refused before writing when circuit-tracer cannot hold it."""
    out = Path(out)
    files = clt_tensors(clt)
    hooks = (HOOKS.get(str(input_site)), HOOKS.get(str(output_site)))
    if None in hooks:
        raise ConfigError(f"circuit-tracer has no hook for {input_site} -> {output_site} (mechfaith writes "
                          f"{', '.join(HOOKS)}); nothing written")
    config: dict[str, Any] = {"model_name": model_name, "model_kind": CLT_KIND, "feature_input_hook": hooks[0],
                              "feature_output_hook": hooks[1], "scan": scan or f"mechfaith/{model_name or 'model'}"}
    if clt.cfg.reach is not None:
        config[REACH] = clt.cfg.reach
    check_replaceable(out, OWN_FILES, "circuit-tracer CLT")
    with atomic_dir(out) as tmp:
        for name, tensors in files.items():
            write_tensors(tmp / name, tensors)
        (tmp / CT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out
