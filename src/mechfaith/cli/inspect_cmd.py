"""``mechfaith inspect PATH``: what a saved coder holds (config, tensors, training summary)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mechfaith.coders.files import CONFIG_NAME, WEIGHTS_NAME, load_coder, read_coder_meta, resolve_coder_folder
from mechfaith.reports.values import fmt_value


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="print a saved coder's config, shapes and training summary",
                              description=__doc__)
    p.add_argument("path", help=f"a coder folder (or its {CONFIG_NAME} / {WEIGHTS_NAME})")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def describe(path: str) -> dict[str, Any]:
    """A JSON-safe description of the coder at ``path`` (fully loaded, so damage is detected)."""
    folder = resolve_coder_folder(path)
    meta = read_coder_meta(folder)
    coder = load_coder(folder)
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
               for k, v in coder.state_dict().items()}
    n_params = sum(p.numel() for p in coder.parameters())
    return {"path": str(folder), "format": meta["format"], "format_version": meta["format_version"],
            "config": meta["config"], "tensors": tensors, "n_parameters": n_params,
            "training": meta.get("training", {})}


def run(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    cfg = info["config"]
    print(f"{info['path']}  ({info['format']} v{info['format_version']})")
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
