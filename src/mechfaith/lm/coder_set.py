"""A coder set (a folder with ``set.json``, written by ``lm train --layers``; or a sparsify run, one
folder per hookpoint, read as a set by :mod:`mechfaith.lm.sparsify_run`) for every command that
takes a coder.

:func:`read_set` reads the manifest and checks it whole: every field's type
(:meth:`~mechfaith.lm.layer_set.SetResult.from_json`), every coder folder inside the set and present,
and each mechfaith coder's recorded layer equal to the manifest's. :func:`set_coder_folders` gives
each layer's coder folder (``circuit`` and ``dashboard`` expand a set into all of them),
:func:`set_layer_coder` one layer's (``faithfulness report SET --layer L``),
:func:`export_set_saelens` one SAELens folder per layer (``lm export SET``) and :func:`summarize_set`
what ``inspect SET`` prints. A damaged or foreign manifest raises :class:`~mechfaith.errors.InputError`
naming ``set.json`` and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechfaith.atomic import atomic_dir, check_replaceable
from mechfaith.coders.files import CONFIG_NAME, read_json
from mechfaith.errors import ConfigError, InputError
from mechfaith.lm.circuit_tracer import is_circuit_tracer_set
from mechfaith.lm.circuit_tracer_set import circuit_tracer_refs
from mechfaith.lm.coder_files import CoderRef, open_coder
from mechfaith.lm.layer_set import SET_JSON, SetResult, layers_text
from mechfaith.lm.saelens import check_saelens_exportable, export_saelens
from mechfaith.lm.sparsify_format import is_sparsify_run
from mechfaith.lm.sparsify_run import read_sparsify_run


def is_coder_set(path: str | Path) -> bool:
    """Whether ``path`` is a set folder (holds ``set.json``), a sparsify run or a circuit-tracer set."""
    return Path(path).is_dir() and ((Path(path) / SET_JSON).is_file() or is_sparsify_run(path)
                                    or is_circuit_tracer_set(path))


def read_set(folder: str | Path) -> SetResult:
    """The checked manifest of the set in ``folder`` (module docstring); one-line errors."""
    folder = Path(folder)
    path = folder / SET_JSON
    if not path.is_file() and is_sparsify_run(folder):
        return read_sparsify_run(folder)
    if not path.is_file() and is_circuit_tracer_set(folder):  # its coders: layer files (opened one by one)
        return circuit_tracer_refs(folder)[0]
    if not path.is_file():
        raise InputError(f"{folder}: no {SET_JSON} (not a coder set written by lm train --layers)")
    data = read_json(path)
    try:
        manifest = SetResult.from_json(data)
    except ConfigError as exc:
        raise InputError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a mechfaith coder set manifest ({exc})") from None
    for l in manifest.layers:
        rel = manifest.coders[str(l)]
        coder = folder / rel
        if not coder.exists():
            raise InputError(f"{path}: layer {l}'s coder {rel} does not exist")
        if (coder / CONFIG_NAME).is_file():
            meta = read_json(coder / CONFIG_NAME)
            training = meta.get("training") if isinstance(meta, dict) else None
            recorded = training.get("layer") if isinstance(training, dict) else None
            if recorded is not None and recorded != l:
                raise InputError(f"{path}: layer {l}'s coder {rel} says it replaces layer {recorded}")
    return manifest


def set_coder_folders(folder: str | Path, manifest: SetResult | None = None) -> dict[int, Path]:
    """Each layer of the set in ``folder`` -> its coder folder (checked by :func:`read_set`)."""
    manifest = manifest or read_set(folder)
    return {l: Path(folder) / manifest.coders[str(l)] for l in manifest.layers}


def set_layer_coder(folder: str | Path, layer: int | None) -> Path:
    """The coder folder of ``layer`` in the set; without a layer, or one not in the set, an error
    that lists the set's layers."""
    folders = set_coder_folders(folder)
    if layer is None:
        raise ConfigError(f"{folder} is a coder set of layers {layers_text(folders)}: choose one with --layer")
    if layer not in folders:
        raise ConfigError(f"{folder}: the set has no layer {layer} (its layers: {layers_text(folders)})")
    return folders[layer]


def export_set_saelens(folder: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[int, Path]:
    """Every layer's coder of the set as a SAELens folder ``out/L<l>/`` (layer -> folder). ``out``
    must be new (or an empty folder) unless ``overwrite`` (then it is replaced whole). All coders are
    opened (checksums checked) before anything is written, then written into a temporary folder
    renamed to ``out`` at the end: an error anywhere (a damaged coder, one SAELens cannot hold) leaves
    nothing behind."""
    folder, out = Path(folder), Path(out)
    check_replaceable(out, (), "coder set export", overwrite=overwrite)
    manifest = read_set(folder)
    refs = {l: open_coder(p) for l, p in set_coder_folders(folder, manifest).items()}
    return export_refs_saelens(refs, out, manifest)


def export_refs_saelens(refs: dict[int, CoderRef], out: str | Path, manifest: SetResult) -> dict[int, Path]:
    """:func:`export_set_saelens` of coders already opened (``manifest``: the set's model and sites)."""
    out = Path(out)
    check_replaceable(out, (), "coder set export")
    for l, ref in refs.items():
        try:
            check_saelens_exportable(ref.coder)
        except ConfigError as exc:
            raise ConfigError(f"layer {l}: {exc}") from None
    with atomic_dir(out) as tmp:
        for l, ref in refs.items():
            export_saelens(ref.coder, tmp / f"L{l}", layer=l, input_site=ref.input_site or manifest.input_site,
                           output_site=ref.output_site or manifest.output_site, model_name=ref.model or manifest.model)
    return {l: out / f"L{l}" for l in refs}


@dataclass
class SetLayerSummary:
    """One layer of a set: its coder (from the coder's own files) and its final training metrics."""

    layer: int
    coder: str  # folder, relative to the set
    kind: str
    activation: str
    k: int | None  # TopK / BatchTopK only
    n_latents: int
    d_in: int
    d_out: int
    skip: bool
    n_parameters: int
    steps: int | None
    train_fve: float | None
    train_l0: float | None
    train_dead_fraction: float | None


@dataclass
class SetSummary:
    """What ``mechfaith inspect SET`` shows."""

    path: str
    model: str
    layers: list[int]
    input_site: str
    output_site: str
    activations: str
    train_seconds: float
    total_seconds: float
    per_layer: list[SetLayerSummary]


def summarize_set(folder: str | Path) -> SetSummary:
    """The set in ``folder`` with every coder fully loaded (so damage anywhere is detected)."""
    folder = Path(folder)
    manifest = read_set(folder)
    runs = {r.layer: r for r in manifest.runs}  # one per layer (imported coders': no steps, no metrics)
    per_layer = []
    for l, path in set_coder_folders(folder, manifest).items():
        coder = open_coder(path).coder
        cfg, metrics = coder.cfg, runs[l].final_train_metrics or {}
        per_layer.append(SetLayerSummary(
            layer=l, coder=manifest.coders[str(l)], kind=cfg.kind, activation=cfg.activation,
            k=cfg.k if cfg.activation in ("topk", "batchtopk") else None, n_latents=cfg.n_latents,
            d_in=coder.d_in, d_out=coder.d_out, skip=bool(cfg.skip), n_parameters=sum(p.numel() for p in coder.parameters()),
            steps=None if runs[l].status == "imported" else runs[l].steps, train_fve=_metric(metrics, "fve"),
            train_l0=_metric(metrics, "l0"), train_dead_fraction=_metric(metrics, "dead_frac")))
    return SetSummary(path=str(folder), model=manifest.model, layers=manifest.layers, input_site=manifest.input_site,
                      output_site=manifest.output_site, activations=manifest.activations,
                      train_seconds=manifest.train_seconds, total_seconds=manifest.total_seconds, per_layer=per_layer)


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else float(value)
