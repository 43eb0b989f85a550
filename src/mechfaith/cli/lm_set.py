"""The set commands of ``mechfaith lm`` (parsing stays in :mod:`mechfaith.cli.lm`):

- ``lm train --layers``: a replacement set (one coder per layer, trained together), also under
  torchrun, where the processes share the layers and rank 0 alone prints the summary::

    torchrun --standalone --nproc_per_node 2 -m mechfaith lm train --layers all --out SET ...

- ``lm eval SET``: the whole set spliced in at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mechfaith.cli.out_guard import run_output
from mechfaith.errors import ConfigError
from mechfaith.lm.config import LMCoderConfig, LMConfig
from mechfaith.lm.corpus import CorpusConfig
from mechfaith.reports.values import fmt_value
from mechfaith.training.config import TrainConfig

SET_NAMES = ("set.json", "layers", "eval.json", "eval.png")  # what lm train --layers (and lm eval SET) write


def run_train_set(args: argparse.Namespace, lm_cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig,
                  train_cfg: TrainConfig, *, progress: bool) -> int:
    """Train the set of ``args.layers`` into ``args.out`` and print its summary (rank 0 only)."""
    from mechfaith.lm.distributed import is_main_process
    from mechfaith.lm.layer_set import SET_JSON, train_set

    if args.eval:
        raise ConfigError("--eval is not available with --layers yet (evaluate a layer's coder with lm eval "
                          "OUT/layers/L<l>)")
    with run_output(args.out, SET_NAMES, "set", overwrite=args.overwrite, resume=args.resume) as out:
        r = train_set(lm_cfg, corpus_cfg, coder_cfg, train_cfg, out, args.layers, activations=args.activations,
                      sae_site=args.sae_site, resume=args.resume, progress=progress)
    if not is_main_process():
        return 0
    print(f"trained {len(r.layers)} coders of {r.model} together from {r.activations}: "
          f"train {r.train_seconds:.0f} s, total {r.total_seconds:.0f} s")
    print("  layer   FVE     L0   dead")
    for s in r.runs:
        m = s.final_train_metrics
        print(f"  {s.layer:5d}  {fmt_value(m.get('fve'), spec='.4f')}  {fmt_value(m.get('l0'), spec='5.1f')}  "
              f"{fmt_value(m.get('dead_frac'), spec='.3f')}")
    print(f"wrote {Path(args.out) / SET_JSON}")
    sys.stdout.flush()
    return 0


def run_eval_set(args: argparse.Namespace, lm_cfg: LMConfig) -> int:
    from mechfaith.lm.coder_files import coder_corpus_with_source
    from mechfaith.lm.coder_set import read_set
    from mechfaith.lm.layer_set import LAYERS_DIR
    from mechfaith.lm.set_eval import DEFAULT_KEEP_MASSIVE, evaluate_set
    from mechfaith.reports.set_plot import plot_set_eval

    manifest = read_set(args.coder)
    first = Path(args.coder) / manifest.coders[str(manifest.layers[0])]
    corpus_cfg = coder_corpus_with_source(first, args.corpus_source)
    e = evaluate_set(args.coder, lm_cfg, corpus_cfg, keep_bos=not args.splice_bos,
                     keep_massive=DEFAULT_KEEP_MASSIVE if args.keep_massive is None else args.keep_massive, out=args.out,
                     progress=not getattr(args, "quiet", False))
    print(f"set of {len(e.layers)} layers of {e.model} on {e.eval_tokens} held-out tokens ({e.eval_source}); "
          f"BOS {'kept' if e.keep_bos else 'spliced'}, "
          f"sinks {'kept above ' + format(e.keep_massive, 'g') + 'x the median' if e.keep_massive else 'spliced'}:")
    abf = f"{e.ce_all_but_first_last:.4f}" if e.ce_all_but_first_last is not None else "n/a"
    print(f"  CE clean {e.ce_clean:.4f}  all replaced {e.ce_all:.4f} ({e.ce_increase:+.4f}, KL {e.kl_all:.4f})  "
          f"all but first and last {abf}  all MLPs zero-ablated {e.ce_zero_ablated:.4f}")
    print("  layer    FVE     L0   dead  dense  CE alone  CE 0..l")
    for p in e.per_layer:
        print(f"  {p.layer:5d}  {fmt_value(p.fve, spec='.3f')}  {fmt_value(p.l0, spec='5.1f')}  "
              f"{fmt_value(p.dead_fraction, spec='.3f')}  {fmt_value(p.dense_fraction, spec='.3f')}  "
              f"{fmt_value(p.ce_alone, spec='.4f')}    {fmt_value(p.ce_prefix, spec='.4f')}")
    figure = Path(args.out).with_suffix(".png") if args.out else Path(args.coder) / "eval.png"
    plot_set_eval(e, figure)
    print(f"  wrote {args.out or Path(args.coder) / 'eval.json'} and {figure} ({e.seconds:.0f} s; "
          f"coders in {LAYERS_DIR}/)")
    return 0
