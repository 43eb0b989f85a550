"""The file commands of ``mechfaith lm`` (parsing stays in :mod:`mechfaith.cli.lm`): ``export`` and
``import`` (SAELens folders, released GPT-2 transcoders), and where ``lm eval`` writes its JSON (checked
before any work, :mod:`mechfaith.cli.out_guard`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mechfaith.atomic import check_replaceable
from mechfaith.cli.out_guard import check_out_file, json_written_by
from mechfaith.errors import ConfigError

EVAL_COMMANDS = ("eval", "eval-set", "eval-clt")  # the "command" of the JSON files lm eval writes


def check_eval_out(args: argparse.Namespace, is_set: bool) -> None:
    """Refuse an ``lm eval`` result path (``--out`` or the default beside the coder) that is a folder,
    or a file lm eval did not write, unless ``--overwrite``; for a set, its figure (the same name
    with ``.png``) too."""
    from mechfaith.lm.coder_files import coder_location, default_eval_path
    from mechfaith.lm.set_eval import SET_EVAL_JSON

    if args.out is not None:
        out = Path(args.out)
    else:
        out = Path(args.coder) / SET_EVAL_JSON if is_set else default_eval_path(coder_location(args.coder))
    is_own = json_written_by(EVAL_COMMANDS)
    check_out_file(out, is_own, overwrite=args.overwrite)
    if is_set:
        figure = out.with_suffix(".png")
        if figure == out:
            raise ConfigError(f"--out {out}: give the JSON file's name (its figure is written beside it, as .png)")
        check_out_file(figure, lambda _: is_own(out), overwrite=args.overwrite, flag="--out (its .png figure)")


def run_export(args: argparse.Namespace) -> int:
    from mechfaith.lm.coder_files import open_coder
    from mechfaith.lm.coder_set import export_set_saelens, is_coder_set
    from mechfaith.lm.layer_set import layers_text
    from mechfaith.lm.saelens import SAELENS_CFG, SAELENS_WEIGHTS, export_saelens

    if is_coder_set(args.coder):
        written = export_set_saelens(args.coder, args.out, overwrite=args.overwrite)
        print(f"wrote {len(written)} SAELens folders {Path(args.out) / 'L<l>'} (layers {layers_text(written)})")
        return 0
    check_replaceable(args.out, (SAELENS_CFG, SAELENS_WEIGHTS), "SAELens folder", overwrite=args.overwrite)
    ref = open_coder(args.coder)
    export_saelens(ref.coder, args.out, layer=ref.layer, input_site=ref.input_site or "mlp_in",
                   output_site=ref.output_site or "mlp_out", model_name=ref.model or "")
    print(f"wrote SAELens folder {args.out} ({ref.coder.cfg.kind}, layer {ref.layer})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from mechfaith.coders.files import CONFIG_NAME, WEIGHTS_NAME, save_coder
    from mechfaith.jsonio import json_safe
    from mechfaith.lm.coder_files import open_coder

    src = Path(args.source)
    if not src.exists():
        raise ConfigError(f"{src}: no such file or folder")
    check_replaceable(args.out, (CONFIG_NAME, WEIGHTS_NAME), "mechfaith coder folder", overwrite=args.overwrite)
    ref = open_coder(src)
    training = {"source": f"imported from {src}", "model": args.model or ref.model, "layer": ref.layer,
                "input_site": ref.input_site, "output_site": ref.output_site}
    save_coder(ref.coder, args.out, training=json_safe(training))
    print(f"wrote coder folder {args.out} ({ref.coder.cfg.kind}, {ref.coder.cfg.activation}, "
          f"{ref.coder.n_latents} latents, layer {ref.layer}, {ref.input_site} -> {ref.output_site})")
    return 0
