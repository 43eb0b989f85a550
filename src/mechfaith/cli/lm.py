"""``mechfaith lm``: sparse coders of language-model MLPs (collect | train | eval | sweep | export | import).

Every command writes its results as JSON next to its artefacts:

- ``collect``: activation cache folder (--out) with ``collect.json`` inside.
- ``train``: run folder (--out) with ``coder/`` (mechfaith coder), ``train.json``, ``metrics.jsonl``,
  ``checkpoint/`` and, unless --activations is given, the ``activations/`` cache it collected.
- ``eval``: ``eval.json`` beside the coder folder (in its run folder) or --out.
- ``sweep``: sweep folder (--out) with ``runs/``, ``sweep.json`` and ``sweep.png``.
- ``export`` / ``import``: SAELens folders (``export SET``: one per layer, ``OUT/L<l>/``, all or none);
  ``import`` also reads the released GPT-2 transcoders (``.pt``, restricted unpickler) into a coder folder.

Defaults (offline): SmolLM2-135M, its middle layer (15), Shakespeare, a TopK (k=64) transcoder with a
linear skip (least-squares initialised), 4608 latents, Adam lr 5e-4, BOS excluded from training.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechfaith.atomic import check_replaceable
from mechfaith.cli.arg_types import device, layers_spec, nonneg_float, nonneg_int, positive_int
from mechfaith.cli.dataclass_args import DefaultsFormatter, add_dataclass_args, add_quiet_option
from mechfaith.cli.lm_configs import data_configs, train_configs
from mechfaith.cli.lm_files import check_eval_out, run_export, run_import
from mechfaith.cli.out_guard import add_overwrite_option, run_output
from mechfaith.errors import ConfigError
from mechfaith.reports.values import fmt_value

if TYPE_CHECKING:
    from mechfaith.lm.evaluate import EvalResult

log = logging.getLogger(__name__)

DEFAULT_SWEEP_VALUES = "16,32,64,128"
# what each command writes into its --out (an earlier one's folder is written again; see cli.out_guard)
RUN_NAMES = ("coder", "train.json", "metrics.jsonl", "checkpoint", "activations", "eval.json", "faithfulness")
SWEEP_NAMES = ("runs", "activations", "sweep.json", "sweep.png")
SWEEP_TRAIN_DEFAULTS = {"n_steps": 150}


def _set_default_help(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Make the help of options whose LM default differs from the dataclass's show the LM default."""
    import re

    for action in p._actions:
        if action.dest in defaults and action.help:
            action.help = re.sub(r"\(default: [^)]*\)", f"(default: {defaults[action.dest]})", action.help)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="TOML or YAML file with sections [lm], [corpus], [coder], [train]")
    add_quiet_option(p, "hide progress bars")


def _add_lm_args(p: argparse.ArgumentParser, *, coder: bool, train: bool) -> None:
    from mechfaith.lm.config import LMCoderConfig, LMConfig
    from mechfaith.lm.corpus import CorpusConfig
    from mechfaith.training.config import TrainConfig

    add_dataclass_args(p.add_argument_group("model and data"), LMConfig)
    add_dataclass_args(p.add_argument_group("corpus"), CorpusConfig, prefix="corpus-")
    if coder:
        add_dataclass_args(p.add_argument_group("coder"), LMCoderConfig)
    if train:
        add_dataclass_args(p.add_argument_group("training"), TrainConfig, exclude={"device"})


def _lm_train_defaults() -> dict[str, Any]:
    from mechfaith.lm.config import LM_TRAIN_DEFAULTS

    return dict(LM_TRAIN_DEFAULTS)


def _add_train_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser("train", help="train a transcoder (or SAE) of one layer's MLP", formatter_class=fmt)
    p.add_argument("--out", default="lm-run", help="run folder (coder/, train.json, metrics.jsonl, ...)")
    p.add_argument("--activations", default=None,
                   help="train from this activation cache (default: collect into OUT/activations; with "
                        "--layers: stream every layer straight from the model, no cache)")
    p.add_argument("--sae-site", default="input", choices=("input", "output"),
                   help="for --kind sae: reconstruct the cached input or output site")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_overwrite_option(p)
    p.add_argument("--eval", action="store_true", help="evaluate the coder right after training")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test in minutes: 31k tokens, 30 steps, 4x latents, k 32 (flags still win)")
    p.add_argument("--layers", type=layers_spec, default=None,
                   help="train a coder at each of these layers together, from one forward pass per batch: 'all', a "
                        "range like 0-29 or a list like 1,3,5 (a replacement set: OUT/set.json and "
                        "OUT/layers/L<l>/; replaces --layer); under torchrun the processes share the layers. "
                        "A set's defaults: 206k tokens, 200 steps, x4 latents, k 32")
    p.add_argument("--clt", action="store_true",
                   help="train ONE cross-layer transcoder over the contiguous block --layers A-B (latents of each "
                        "layer write to that layer's MLP output and every later one of the block): OUT/clt/; "
                        "--n-latents and --k are per layer")
    p.add_argument("--reach", type=nonneg_int, default=None,
                   help="with --clt: each latent writes to at most this many later layers (default: all; 0: a "
                        "per-layer transcoder set)")
    _common(p)
    _add_lm_args(p, coder=True, train=True)
    _set_default_help(p, _lm_train_defaults())
    p.set_defaults(func=run, lm_func=_run_train)


def add_parser(subparsers) -> None:
    lm = subparsers.add_parser("lm", help="transcoders / SAEs of language-model MLPs",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = lm.add_subparsers(dest="lm_command", metavar="{collect,train,eval,sweep,export,import}")
    sub.required = True
    fmt = DefaultsFormatter

    p = sub.add_parser("collect", help="collect MLP input/output activations into a cache folder",
                       formatter_class=fmt)
    p.add_argument("--out", default="lm-activations",
                   help="cache folder: new, empty, or a cache collected before (replaced whole)")
    p.add_argument("--layers", type=layers_spec, default=None,
                   help="layers collected in one pass: 'all', a range like 0-29 or a list like 1,3,5 "
                        "(default: --layer); a set trains from it with lm train --layers ... --activations")
    add_overwrite_option(p)
    _common(p)
    _add_lm_args(p, coder=False, train=False)
    p.set_defaults(func=run, lm_func=_run_collect)

    _add_train_parser(sub, fmt)

    p = sub.add_parser("eval", help="splice a trained coder into its model on held-out text",
                       formatter_class=fmt)
    p.add_argument("coder", help="run folder, coder folder, SAELens folder, legacy GPT-2 transcoder .pt, or a "
                                 "set folder (set.json, from lm train --layers): all layers spliced at once")
    p.add_argument("--out", default=None, help="result JSON (default: eval.json beside the coder folder)")
    add_overwrite_option(p, "replace an existing --out (or default eval.json) that lm eval did not write")
    p.add_argument("--model", default=None, help="model (default: the one the coder was trained on)")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the coder's)")
    p.add_argument("--eval-contexts", type=positive_int, default=None, help="held-out contexts (default 64; 16 for a set, whose "
                   "evaluation runs the model about twice per layer)")
    p.add_argument("--batch-contexts", type=positive_int, default=None, help="contexts per forward pass (default 32)")
    p.add_argument("--corpus-source", default=None, help="text source (default: the coder's corpus)")
    p.add_argument("--device", type=device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the model's weights")
    p.add_argument("--keep-bos", action="store_true",
                   help="keep the model's own MLP output at BOS when splicing")
    p.add_argument("--splice-bos", action="store_true",
                   help="for a set (a folder with set.json): replace BOS too (default: every layer keeps "
                        "the model's own MLP output at BOS, which the set's coders never saw)")
    p.add_argument("--keep-massive", type=nonneg_float, default=None, metavar="RATIO",
                   help="for a set: positions whose own MLP output norm exceeds RATIO x the median (attention "
                        "sinks, left out of a streamed set's training) keep it; 0 replaces them too (default: 50)")
    p.add_argument("--include-bos", action="store_true",
                   help="include BOS in FVE / L0 statistics (default: reported separately)")
    add_quiet_option(p, "hide progress bars")
    p.set_defaults(func=run, lm_func=_run_eval)

    p = sub.add_parser("sweep", help="SAEs and transcoders over several sparsity settings; L0 vs CE plot",
                       formatter_class=fmt)
    p.add_argument("--out", default="lm-sweep", help="sweep folder (runs/, sweep.json, sweep.png)")
    p.add_argument("--values", default=None,
                   help=f"sparsity settings: k for topk/batchtopk (default {DEFAULT_SWEEP_VALUES}), "
                        f"else sparsity coefficients (required)")
    p.add_argument("--kinds", default="transcoder,sae", help="which coders: transcoder, sae or both")
    p.add_argument("--activations", default=None, help="use this activation cache")
    add_overwrite_option(p)
    _common(p)
    _add_lm_args(p, coder=True, train=True)
    _set_default_help(p, {**_lm_train_defaults(), **SWEEP_TRAIN_DEFAULTS})
    p.set_defaults(func=run, lm_func=_run_sweep)

    p = sub.add_parser("export", help="write a coder as a SAELens folder", formatter_class=fmt)
    p.add_argument("coder", help="run folder, mechfaith coder folder, or a set folder (set.json): every layer")
    p.add_argument("--out", required=True, help="SAELens folder to write (for a set: a new folder, one L<l>/ per layer)")
    add_overwrite_option(p)
    p.set_defaults(func=run, lm_func=run_export)

    p = sub.add_parser("import", help="read a SAELens folder or a released GPT-2 transcoder (.pt)",
                       formatter_class=fmt)
    p.add_argument("source", help="SAELens folder (cfg.json + sae_weights.safetensors) or .pt file")
    p.add_argument("--out", required=True, help="mechfaith coder folder to write")
    p.add_argument("--model", default=None, help="model name to record (e.g. gpt2 for the legacy files)")
    add_overwrite_option(p)
    p.set_defaults(func=run, lm_func=run_import)


def _progress(args: argparse.Namespace) -> bool:
    return not bool(getattr(args, "quiet", False))


# ---------------------------------------------------------------------- commands
def run(args: argparse.Namespace) -> int:
    return int(args.lm_func(args) or 0)


def _run_collect(args: argparse.Namespace) -> int:
    from mechfaith.lm.activation_cache import INDEX_NAME
    from mechfaith.lm.collect import collect
    from mechfaith.lm.layer_set import parse_layers
    from mechfaith.lm.model_cache import get_model

    out = Path(args.out)
    old_cache = {c.name for c in out.iterdir()} if (out / INDEX_NAME).is_file() else set()
    check_replaceable(out, old_cache, "activation cache", overwrite=args.overwrite)  # an old cache: replaced whole
    lm_cfg, corpus_cfg = data_configs(args)
    layers = None
    if args.layers:
        layers = parse_layers(args.layers, get_model(lm_cfg).adapter.n_layers)
    s = collect(lm_cfg, corpus_cfg, args.out, layers=layers, progress=_progress(args))
    print(f"collected {s.n_tokens} tokens x layers {s.layers} of {s.model} "
          f"({s.input_site} -> {s.output_site}) in {s.seconds:.0f} s "
          f"({s.tokens_per_second:.0f} tok/s) into {args.out}")
    return 0


def _print_eval(e: EvalResult) -> None:
    print(f"eval {e.model} layer {e.layer} on {e.eval_tokens} held-out tokens "
          f"({e.eval_source}):")
    print(f"  FVE {fmt_value(e.fve, spec='.4f')}  L0 {fmt_value(e.l0, spec='.1f')} "
          f"(BOS {fmt_value(e.l0_bos, spec='.1f')})  "
          f"dead {fmt_value(e.dead_fraction, spec='.3f')}  dense {fmt_value(e.dense_fraction, spec='.3f')}")
    if e.ce_clean is not None:
        assert e.loss_recovered_zero is not None and e.loss_recovered_mean is not None  # set with ce_clean
        print(f"  CE clean {e.ce_clean:.4f}  spliced {e.ce_spliced:.4f} ({e.ce_increase:+.4f})  "
              f"zero-ablated {e.ce_zero_ablated:.4f}  mean-ablated {e.ce_mean_ablated:.4f}")
        print(f"  loss recovered {100 * e.loss_recovered_zero:.1f}% (vs zero-ablation), "
              f"{100 * e.loss_recovered_mean:.1f}% (vs mean-ablation); KL spliced {e.kl_spliced:.4f}, "
              f"zero-ablated {e.kl_zero_ablated:.4f}")
    else:
        print(f"  final hidden states: relative error spliced {e.hidden_rel_error_spliced:.4f}, "
              f"zero-ablated {e.hidden_rel_error_zero_ablated:.4f}")
    print(f"  wrote {e.path} ({e.seconds:.0f} s)")


def _run_train(args: argparse.Namespace) -> int:
    from mechfaith.lm.config import QUICK_PROFILE, SET_PROFILE
    from mechfaith.lm.evaluate import evaluate
    from mechfaith.lm.train import train_coder

    profile = QUICK_PROFILE if args.quick else SET_PROFILE if args.layers is not None else None
    lm_cfg, corpus_cfg, coder_cfg, train_cfg = train_configs(args, profile=profile)
    if args.reach is not None and not args.clt:
        raise ConfigError("--reach applies to --clt only")
    if args.clt:
        from mechfaith.cli.lm_clt import run_train_clt

        return run_train_clt(args, lm_cfg, corpus_cfg, coder_cfg, train_cfg, progress=_progress(args))
    if args.layers is not None:
        from mechfaith.cli.lm_set import run_train_set

        return run_train_set(args, lm_cfg, corpus_cfg, coder_cfg, train_cfg, progress=_progress(args))
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        raise ConfigError("under torchrun, lm train trains a set: give --layers (the processes share the layers)")
    with run_output(args.out, RUN_NAMES, "lm train run", overwrite=args.overwrite, resume=args.resume) as out:
        s = train_coder(lm_cfg, corpus_cfg, coder_cfg, train_cfg, out, activations=args.activations,
                        sae_site=args.sae_site, resume=args.resume, progress=_progress(args))
        m = s.final_train_metrics
        print(f"trained {s.coder_config['kind']} of {s.model} layer {s.layer}: {s.steps} steps, "
              f"{s.tokens} tokens ({s.unique_tokens} unique, {s.epochs:.2f} epochs); "
              f"train FVE {fmt_value(m.get('fve'), spec='.4f')}, L0 {fmt_value(m.get('l0'), spec='.1f')}, "
              f"dead {fmt_value(m.get('dead_frac'), spec='.3f')}")
        print(f"  collect {s.collect_seconds:.0f} s, train {s.train_seconds:.0f} s, "
              f"total {s.total_seconds:.0f} s; wrote {Path(args.out) / 'train.json'}")
        if args.eval:
            _print_eval(evaluate(out, lm_cfg, corpus_cfg, progress=_progress(args)))
    sys.stdout.flush()
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from mechfaith.lm.coder_files import coder_corpus_with_source
    from mechfaith.lm.coder_set import is_coder_set
    from mechfaith.lm.config import LMConfig
    from mechfaith.lm.evaluate import evaluate
    from mechfaith.lm.set_eval import SET_EVAL_CONTEXTS

    if args.layer is not None and is_coder_set(args.coder):
        raise ConfigError("--layer does not apply to a set (lm eval SET splices all its layers; evaluate one "
                          "layer's coder with lm eval SET/layers/L<l>)")
    base = LMConfig()
    lm_cfg = dataclasses.replace(
        base, model=args.model or base.model, layer=args.layer if args.layer is not None else base.layer,
        eval_contexts=args.eval_contexts or (SET_EVAL_CONTEXTS if is_coder_set(args.coder) else base.eval_contexts),
        batch_contexts=args.batch_contexts or base.batch_contexts, device=args.device, dtype=args.dtype,
        exclude_bos=not args.include_bos)
    from mechfaith.cli.lm_clt import is_clt_run

    if is_clt_run(args.coder):
        from mechfaith.cli.lm_clt import print_clt_eval

        if args.layer is not None:
            raise ConfigError("--layer does not apply to a CLT (lm eval RUN splices its whole block)")
        check_eval_out(args, True)
        return print_clt_eval(args, lm_cfg, None, args.coder, args.out)
    check_eval_out(args, is_coder_set(args.coder))
    if is_coder_set(args.coder):
        from mechfaith.cli.lm_set import run_eval_set

        return run_eval_set(args, lm_cfg)
    corpus_cfg = coder_corpus_with_source(args.coder, args.corpus_source)
    e = evaluate(args.coder, lm_cfg, corpus_cfg, out=args.out, keep_bos=args.keep_bos,
                 model_given=args.model is not None, layer_given=args.layer is not None,
                 progress=_progress(args))
    _print_eval(e)
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from mechfaith.lm.sweep import run_sweep, sweep_param
    from mechfaith.reports.sweep_plot import plot_sweep

    lm_cfg, corpus_cfg, coder_cfg, train_cfg = train_configs(args, train_defaults=SWEEP_TRAIN_DEFAULTS)
    param = sweep_param(coder_cfg.activation)
    raw = args.values or (DEFAULT_SWEEP_VALUES if param == "k" else None)
    if raw is None:
        raise ConfigError(f"--values is required for a {coder_cfg.activation} sweep (sparsity coefficients)")
    try:
        values = [float(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--values must be comma-separated numbers, got {raw!r}") from None
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    with run_output(args.out, SWEEP_NAMES, "sweep", overwrite=args.overwrite) as out:
        r = run_sweep(lm_cfg, corpus_cfg, coder_cfg, train_cfg, values, out, kinds=kinds,
                      activations=args.activations, progress=_progress(args))
        plot_sweep(r, out / Path(r.figure).name)
    base = r.baseline
    layer = str(r.layer)
    if base.ce_clean is not None and base.ce_mean_ablated is not None and base.ce_zero_ablated is not None:
        print(f"sweep {r.model} layer {layer}: CE clean {base.ce_clean:.4f}, mean-ablated "
              f"{base.ce_mean_ablated[layer]:.4f}, zero-ablated {base.ce_zero_ablated[layer]:.4f}")
    for run_ in r.runs:
        print(f"  {run_.name:24s} L0 {fmt_value(run_.l0, spec='7.1f')}  FVE {fmt_value(run_.fve, spec='.3f')}  "
              f"{'CE' if run_.ce_spliced is not None else 'hidden err'} "
              f"{fmt_value(run_.spliced, spec='.4f')}")
    print(f"wrote {Path(args.out) / 'sweep.json'} and {r.figure} ({r.total_seconds:.0f} s)")
    return 0
