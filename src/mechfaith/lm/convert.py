"""``mechfaith convert``: a coder, or a set, from any format mechfaith reads
(:func:`~mechfaith.lm.formats.detect_format`) into mechfaith, SAELens or sparsify files.

- One coder (a mechfaith, SAELens or sparsify folder, a dictionary_learning ``ae.pt``, a legacy
  GPT-2 ``.pt``) becomes one folder:
  a mechfaith coder folder, a SAELens folder or a sparsify folder, with its model, layer and sites.
- A set (a mechfaith ``set.json`` folder, a sparsify run or a circuit-tracer set) becomes a set: a
  mechfaith set (``set.json`` + ``layers/L<l>/coder``), a circuit-tracer set
  (``OUT/layer_<l>.safetensors`` + ``config.yaml``; sets only), one SAELens folder per layer (``OUT/L<l>/``, as
  ``lm export SET``) or a sparsify run (``OUT/<hookpoint>/``).
- A cross-layer transcoder (a mechfaith CLT folder or a circuit-tracer CLT) becomes a mechfaith CLT
  folder or a circuit-tracer CLT (``OUT/W_enc_<i>.safetensors``, ``W_dec_<i>.safetensors``,
  ``config.yaml``; :mod:`mechfaith.lm.circuit_tracer_clt`); SAELens and sparsify hold no CLT.

What the target cannot hold is refused in one line before anything is written (SAELens has no
TopK transcoder; sparsify holds TopK coders only). ``OUT`` is written whole and atomically, and
only when it is new, empty, or a conversion of the same kind written before
(:func:`~mechfaith.atomic.check_replaceable`); it may neither be ``SRC`` nor hold it nor lie in it.
dictionary_learning files are not written yet (one line, nothing written).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mechfaith.atomic import atomic_dir, check_replaceable
from mechfaith.coders.clt_files import load_clt, read_clt_meta, save_clt
from mechfaith.coders.files import CONFIG_NAME, WEIGHTS_NAME, save_coder
from mechfaith.errors import ConfigError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.circuit_tracer import export_circuit_tracer_set
from mechfaith.lm.circuit_tracer_clt import CircuitTracerCLT, export_circuit_tracer_clt, read_circuit_tracer_clt
from mechfaith.lm.circuit_tracer_set import circuit_tracer_refs
from mechfaith.lm.coder_files import CODER_DIR, CoderRef, open_coder
from mechfaith.lm.coder_set import export_refs_saelens, read_set, set_coder_folders
from mechfaith.lm.formats import CLT_FORMATS, FORMATS, SET_FORMATS, detect_format
from mechfaith.lm.layer_set import LAYERS_DIR, SET_JSON, SetResult
from mechfaith.lm.saelens import SAELENS_CFG, SAELENS_WEIGHTS, export_saelens
from mechfaith.lm.sparsify import SPARSIFY_CFG, SPARSIFY_WEIGHTS, export_set_sparsify, export_sparsify

TARGETS = ("mechfaith", "saelens", "sparsify", "circuit-tracer")
NOT_YET = ("dictionary-learning",)


@dataclass
class ConvertResult:
    """What :func:`convert` read and wrote."""

    source: Path
    source_format: str  # a key of mechfaith.lm.formats.FORMATS
    target: str  # one of TARGETS
    out: Path
    kind: str  # the coder's kind and activation, or "set"
    layer: int | None  # one coder's layer
    folders: dict[int, Path]  # a set: each layer's written folder


def check_apart(src: Path, out: Path) -> None:
    """Refuse an ``OUT`` that is ``SRC``, holds it or lies in it (replacing it whole would lose ``SRC``)."""
    a, b = src.resolve(), out.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ConfigError(f"--out {out} overlaps the source {src}: give --out a folder outside it")


def convert(src: str | Path, to: str, out: str | Path) -> ConvertResult:
    """Convert the coder or set at ``src`` into ``to``'s files in ``out`` (module docstring)."""
    if to in NOT_YET:
        raise ConfigError(f"--to {to}: not yet supported (mechfaith converts to {', '.join(TARGETS)})")
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r}: unknown format (mechfaith converts to {', '.join(TARGETS)})")
    found = detect_format(src)
    out = Path(out)
    check_apart(Path(src), out)
    if found.format in SET_FORMATS:
        return convert_set(found.path, found.format, to, out)
    if found.format in CLT_FORMATS:
        return convert_clt(found.path, found.format, to, out)
    if to == "circuit-tracer":
        raise ConfigError(f"--to circuit-tracer: {src} is one coder; circuit-tracer reads sets of transcoders for every "
                          f"layer from 0 (give a set: a mechfaith set, a sparsify run or a circuit-tracer set; "
                          f"or a cross-layer transcoder)")
    ref = open_coder(found.path)
    cfg = ref.coder.cfg
    kind = f"{cfg.activation} {cfg.kind}" + (" with a skip" if cfg.skip else "")
    if to == "mechfaith":
        check_replaceable(out, (CONFIG_NAME, WEIGHTS_NAME), "mechfaith coder folder")
        save_coder(ref.coder, out, training=imported_training(ref, f"converted from {src} ({FORMATS[found.format]})"))
    elif to == "saelens":
        check_replaceable(out, (SAELENS_CFG, SAELENS_WEIGHTS), "SAELens folder")
        export_saelens(ref.coder, out, layer=ref.layer, input_site=ref.input_site or "mlp_in",
                       output_site=ref.output_site or "mlp_out", model_name=ref.model or "")
    else:
        check_replaceable(out, (SPARSIFY_CFG, SPARSIFY_WEIGHTS), "sparsify folder")
        export_sparsify(ref.coder, out, layer=ref.layer, input_site=ref.input_site, output_site=ref.output_site,
                        model_name=ref.model)
    return ConvertResult(Path(src), found.format, to, out, kind, ref.layer, {})


def imported_training(ref: CoderRef, source: str) -> dict[str, object]:
    """The ``training`` metadata of a coder written from another one's files."""
    return json_safe({"source": source, "model": ref.model, "layer": ref.layer, "input_site": ref.input_site,
                      "output_site": ref.output_site, "corpus": ref.corpus})


def convert_set(folder: Path, source_format: str, to: str, out: Path) -> ConvertResult:
    """A set (a mechfaith set, a sparsify run or a circuit-tracer set) as a set in ``to``'s files."""
    if source_format == "circuit-tracer":
        manifest, refs = circuit_tracer_refs(folder)
    else:
        manifest = read_set(folder)
        refs = {l: open_coder(p) for l, p in set_coder_folders(folder, manifest).items()}
    if to == "saelens":
        written = export_refs_saelens(refs, out, manifest)
    elif to == "sparsify":
        written = export_set_sparsify(refs, out, manifest.model or None)
    elif to == "circuit-tracer":
        written = export_circuit_tracer_set({l: r.coder for l, r in refs.items()}, out, model_name=manifest.model or None,
                                            input_site=manifest.input_site, output_site=manifest.output_site)
    else:
        written = write_mechfaith_set(manifest, refs, out, f"converted from {folder} ({FORMATS[source_format]})")
    return ConvertResult(folder, source_format, to, out, "set", None, written)


def read_any_clt(folder: Path, source_format: str) -> CircuitTracerCLT:
    """A mechfaith or circuit-tracer CLT, with its model and sites (those of a mechfaith CLT from its
    ``training`` metadata, when it names them)."""
    if source_format == "circuit-tracer-clt":
        return read_circuit_tracer_clt(folder)
    meta = read_clt_meta(folder).get("training") or {}
    text = {k: v if isinstance(v := meta.get(k), str) else None for k in ("model", "input_site", "output_site")}
    return CircuitTracerCLT(load_clt(folder), text["model"], None, None, None, text["input_site"],
                            text["output_site"])


def convert_clt(folder: Path, source_format: str, to: str, out: Path) -> ConvertResult:
    """A cross-layer transcoder as a mechfaith CLT folder or a circuit-tracer CLT."""
    if to not in ("mechfaith", "circuit-tracer"):
        raise ConfigError(f"--to {to}: {folder} is a cross-layer transcoder, which {to} files cannot hold "
                          "(mechfaith converts a CLT to mechfaith or circuit-tracer); nothing written")
    c = read_any_clt(folder, source_format)
    cfg = c.clt.cfg
    kind = f"{cfg.activation} cross-layer transcoder over {cfg.n_layers} layers" + (" with a skip" if cfg.skip else "")
    if to == "circuit-tracer":
        export_circuit_tracer_clt(c.clt, out, model_name=c.model_name, input_site=c.input_site or "mlp_in",
                                  output_site=c.output_site or "mlp_out", scan=c.scan)
    else:
        check_replaceable(out, (CONFIG_NAME, WEIGHTS_NAME), "mechfaith CLT folder")
        save_clt(c.clt, out, training=json_safe({
            "source": f"converted from {folder} ({FORMATS[source_format]})", "model": c.model_name,
            "input_site": c.input_site, "output_site": c.output_site, "feature_input_hook": c.feature_input_hook,
            "feature_output_hook": c.feature_output_hook, "scan": c.scan}))
    return ConvertResult(folder, source_format, to, out, kind, None, {})


def write_mechfaith_set(manifest: SetResult, refs: dict[int, CoderRef], out: Path, source: str) -> dict[int, Path]:
    """``refs`` as a mechfaith set in ``out`` (``set.json`` + ``layers/L<l>/coder``), the manifest's
    model, sites and training summaries kept; all or nothing."""
    check_replaceable(out, (SET_JSON, LAYERS_DIR), "coder set")
    coders = {l: str(Path(LAYERS_DIR) / f"L{l}" / CODER_DIR) for l in refs}
    runs = [dataclasses.replace(r, coder_folder=str(out / coders[r.layer])) for r in manifest.runs]
    result = dataclasses.replace(manifest, coders={str(l): c for l, c in coders.items()}, runs=runs)
    with atomic_dir(out) as tmp:
        for l, ref in refs.items():
            model = ref.model or manifest.model or None
            ref = dataclasses.replace(ref, model=model, layer=l)
            save_coder(ref.coder, tmp / coders[l], training=imported_training(ref, source))
        write_json(tmp / SET_JSON, result.to_json())
    return {l: out / c for l, c in coders.items()}
