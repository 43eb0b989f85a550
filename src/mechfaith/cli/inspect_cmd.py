"""``mechfaith inspect PATH``: what a saved coder holds (config, tensors, training summary).

PATH may be in any format mechfaith reads (a SAELens or sparsify folder, a legacy GPT-2 ``.pt``:
shown as the mechfaith coder it reads as, with its model, layer and sites).

For a set folder (``set.json``, from ``lm train --layers``; or a sparsify run): the model, layers and sites, and per
layer its coder (kind, activation, latents, shapes, parameters; every coder is fully loaded, so
damage anywhere is reported) with its final training FVE, L0 and dead fraction from the manifest.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mechfaith.coders.files import CONFIG_NAME, WEIGHTS_NAME, load_coder, read_coder_meta, resolve_coder_folder
from mechfaith.configs import config_to_dict
from mechfaith.reports.values import fmt_value


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="print a saved coder's config, shapes and training summary",
                              description=__doc__)
    p.add_argument("path", help=f"a coder folder (or its {CONFIG_NAME} / {WEIGHTS_NAME}), a set folder (set.json), "
                                f"or a coder or run in another format mechfaith reads (SAELens, sparsify, .pt)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def describe(path: str) -> dict[str, Any]:
    """A JSON-safe description of the coder at ``path`` (fully loaded, so damage is detected)."""
    from mechfaith.lm.formats import detect_format

    if detect_format(path).format != "mechfaith":
        return describe_foreign(path)
    folder = resolve_coder_folder(path)
    meta = read_coder_meta(folder)
    coder = load_coder(folder)
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
               for k, v in coder.state_dict().items()}
    n_params = sum(p.numel() for p in coder.parameters())
    # the config the coder was built with (the file may leave out fields that have defaults)
    return {"path": str(folder), "format": meta["format"], "format_version": meta["format_version"],
            "config": config_to_dict(coder.cfg), "tensors": tensors, "n_parameters": n_params,
            "training": meta.get("training") or {}}


def describe_foreign(path: str) -> dict[str, Any]:
    """:func:`describe` of a coder in another format: the mechfaith coder it reads as."""
    from mechfaith.configs import config_to_dict
    from mechfaith.lm.coder_files import open_coder
    from mechfaith.lm.formats import detect_format

    found = detect_format(path)
    ref = open_coder(found.path)
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
               for k, v in ref.coder.state_dict().items()}
    return {"path": str(found.path), "format": found.format, "format_version": None,
            "config": config_to_dict(ref.coder.cfg), "tensors": tensors,
            "n_parameters": sum(p.numel() for p in ref.coder.parameters()),
            "training": {"model": ref.model, "layer": ref.layer, "input_site": ref.input_site,
                         "output_site": ref.output_site}}


def run_set(args: argparse.Namespace) -> int:
    """``inspect SET``: the set's summary (:func:`~mechfaith.lm.coder_set.summarize_set`)."""
    import dataclasses

    from mechfaith.lm.coder_set import summarize_set
    from mechfaith.lm.formats import detect_format
    from mechfaith.lm.layer_set import SET_FORMAT, layers_text

    info = summarize_set(args.path)
    fmt = {"mechfaith-set": SET_FORMAT, "circuit-tracer": "circuit-tracer set"}.get(
        detect_format(args.path).format, "sparsify run")
    if args.json:
        print(json.dumps({"format": fmt, **dataclasses.asdict(info)}, indent=2, default=str))
        return 0
    print(f"{info.path}  ({fmt}: {len(info.layers)} layers of {info.model or 'an unnamed model'}, "
          f"{info.input_site} -> {info.output_site})")
    trained = (f"trained together in {info.train_seconds:.1f} s (total {info.total_seconds:.1f} s)"
               if fmt == SET_FORMAT else "not trained by mechfaith")
    print(f"  layers {layers_text(info.layers)}; {trained}; activations {info.activations}")
    print("  layer  coder                     kind        activation   latents  d_in->d_out  skip     steps  "
          "train FVE  L0     dead")
    for r in info.per_layer:
        act = r.activation + (f" k={r.k}" if r.k is not None else "")
        print(f"  {r.layer:5d}  {r.coder:24s}  {r.kind:10s}  {act:11s}  {r.n_latents:7d}  "
              f"{f'{r.d_in}->{r.d_out}':11s}  {'yes' if r.skip else 'no':4s}  {fmt_value(r.steps):>6s}  "
              f"{fmt_value(r.train_fve, spec='.4f'):9s}  {fmt_value(r.train_l0, spec='.1f'):5s}  "
              f"{fmt_value(r.train_dead_fraction, spec='.3f')}")
    return 0


def run(args: argparse.Namespace) -> int:
    from mechfaith.lm.coder_set import is_coder_set

    if is_coder_set(args.path):
        return run_set(args)
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    cfg = info["config"]
    version = f" v{info['format_version']}" if info["format_version"] is not None else " files, read as a mechfaith coder"
    print(f"{info['path']}  ({info['format']}{version})")
    print(f"  {cfg['kind']}: {cfg['d_in']} -> {cfg['n_latents']} latents -> {cfg['d_out']}, "
          f"activation {cfg['activation']}" + (f" (k={cfg['k']})" if cfg["activation"] in ("topk", "batchtopk") else "")
          + (", skip" if cfg.get("skip") else "") + f", decoder norm {cfg['decoder_norm']}")
    print("config:")
    for k, v in cfg.items():
        print(f"  {k:28s} {fmt_value(v, spec='.6g', missing='None')}")
    print(f"tensors ({info['n_parameters']:,} parameters):")
    for k, v in info["tensors"].items():
        print(f"  {k:28s} {v['dtype']:8s} {'x'.join(map(str, v['shape'])) or 'scalar'}")
    training = info["training"]
    print("training:" + ("" if training else " (none recorded)"))
    for k, v in training.items():
        if isinstance(v, dict):
            print(f"  {k}:")
            for k2, v2 in v.items():
                print(f"    {k2:26s} {fmt_value(v2, spec='.6g', missing='None')}")
        else:
            print(f"  {k:28s} {fmt_value(v, spec='.6g', missing='None')}")
    return 0
