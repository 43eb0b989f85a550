"""A sparsify run (one sparsify folder per hookpoint) as a mechfaith coder set, and a set written
as a sparsify run.

:func:`read_sparsify_run` gives the run's manifest as a :class:`~mechfaith.lm.layer_set.SetResult`
(what every set-aware command reads, :mod:`mechfaith.lm.coder_set`): each hookpoint's layer and
sites (:func:`~mechfaith.lm.sparsify_format.parse_hookpoint`, or our entry in its header), the
model from the run's ``config.json`` (sparsify's command line records it) or from our entries, and
a summary per layer saying the coder was not trained here (:func:`imported_run`). Hookpoints that
name no layer, or two hookpoints of one layer, are refused in one line naming them (give one
hookpoint folder instead). Only headers are read: the weights are read when a command opens them.

:func:`export_set_sparsify` writes every layer's coder of a set as ``OUT/<hookpoint>/``
(:func:`~mechfaith.lm.sparsify_format.hookpoint_for`), all checked before anything is written, all
or nothing, as sparsify's ``SparseCoder.load_many`` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechfaith.atomic import atomic_dir, check_replaceable
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_json
from mechfaith.configs import config_to_dict
from mechfaith.errors import ConfigError, InputError, MechfaithError
from mechfaith.lm.coder_files import CoderRef
from mechfaith.lm.layer_set import SetResult
from mechfaith.lm.sparsify_format import RUN_CONFIG, hookpoint_for, run_hookpoints
from mechfaith.lm.sparsify_read import SparsifyHeader, read_header
from mechfaith.lm.sparsify_write import check_sparsify_exportable, export_sparsify
from mechfaith.lm.train import TrainCoderResult

SPARSIFY_RUN = "sparsify run"  # the manifest's ``activations``: where the coders came from


def imported_run(source: str, model: str, layer: int, input_site: str, output_site: str, cfg: CoderConfig,
                 coder_folder: str) -> TrainCoderResult:
    """The training summary of a coder that was not trained by mechfaith (status "imported", no
    steps, no metrics)."""
    return TrainCoderResult(
        source=source, model=model, layer=layer, input_site=input_site, output_site=output_site,
        activations=source, corpus=None, train_config={}, lm_coder_config={}, steps=0, tokens=0, status="imported",
        coder_config=config_to_dict(cfg), coder_folder=coder_folder, message=None, unique_tokens=0, epochs=0.0,
        skip_lstsq_fve=None, final_train_metrics={}, train_seconds=0.0, collect_seconds=0.0, total_seconds=0.0)


def run_model_name(folder: Path) -> str | None:
    """The model recorded in the run's ``config.json`` (sparsify's command line writes ``model``)."""
    path = folder / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except MechfaithError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


def _config_of(header_cfg: dict[str, Any]) -> CoderConfig:
    return CoderConfig(d_in=header_cfg["d_in"], n_latents=header_cfg["num_latents"], d_out=header_cfg["d_in"],
                       kind="transcoder" if header_cfg["transcode"] else "sae", activation="topk",
                       k=min(header_cfg["k"], header_cfg["num_latents"]), skip=bool(header_cfg["skip_connection"]))


def read_sparsify_run(folder: str | Path) -> SetResult:
    """The run in ``folder`` as a set manifest (module docstring); one-line errors."""
    folder = Path(folder)
    hookpoints = run_hookpoints(folder)
    if not hookpoints:
        raise InputError(f"{folder}: not a sparsify run (no sub-folder with cfg.json and sae.safetensors)")
    names = ", ".join(hookpoints)
    by_layer: dict[int, tuple[str, SparsifyHeader]] = {}
    for name, path in hookpoints.items():
        header = read_header(path)
        if header.layer is None:
            raise InputError(f"{folder}: a sparsify run of hookpoints {names}: {name!r} names no layer, so the "
                             f"run is not a set of layers (give one hookpoint folder, {folder / name})")
        if header.layer in by_layer:
            raise InputError(f"{folder}: a sparsify run of hookpoints {names}: {by_layer[header.layer][0]!r} and "
                             f"{name!r} are both at layer {header.layer} (give one hookpoint folder)")
        by_layer[header.layer] = (name, header)
    order = sorted(by_layer)
    model = run_model_name(folder) or next((h.model_name for _, h in by_layer.values() if h.model_name), "")
    runs = [imported_run(f"{SPARSIFY_RUN} {folder}", model, l, by_layer[l][1].input_site or "",
                         by_layer[l][1].output_site or "", _config_of(by_layer[l][1].cfg), by_layer[l][0])
            for l in order]
    first = runs[0]
    return SetResult(model=model, layers=order, input_site=first.input_site, output_site=first.output_site,
                     coders={str(l): by_layer[l][0] for l in order}, activations=SPARSIFY_RUN, runs=runs,
                     train_seconds=0.0, total_seconds=0.0)


def sparsify_hookpoints(refs: dict[int, CoderRef], model: str | None) -> dict[int, str]:
    """Each layer's hookpoint, every coder checked writable first (a :class:`ConfigError` naming
    the layer otherwise)."""
    out: dict[int, str] = {}
    for l, ref in refs.items():
        try:
            check_sparsify_exportable(ref.coder.cfg)
            out[l] = hookpoint_for(l, ref.input_site, ref.output_site, ref.coder.cfg.kind, ref.model or model)
        except ConfigError as exc:
            raise ConfigError(f"layer {l}: {exc}") from None
    return out


def export_set_sparsify(refs: dict[int, CoderRef], out: str | Path, model: str | None = None) -> dict[int, Path]:
    """Every layer's coder as a sparsify run ``out/<hookpoint>/`` (layer -> folder); ``out`` must
    be new, empty, or a run written before with the same hookpoints (replaced whole)."""
    hookpoints = sparsify_hookpoints(refs, model)
    out = Path(out)
    check_replaceable(out, tuple(hookpoints.values()), "sparsify run")
    with atomic_dir(out) as tmp:
        for l, ref in refs.items():
            export_sparsify(ref.coder, tmp / hookpoints[l], layer=l, input_site=ref.input_site,
                            output_site=ref.output_site, model_name=ref.model or model)
    return {l: out / h for l, h in hookpoints.items()}
