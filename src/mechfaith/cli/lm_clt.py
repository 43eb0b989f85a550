"""``mechfaith lm train --clt --layers A-B`` and ``mechfaith lm eval RUN`` for cross-layer transcoders."""

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


def is_clt_run(path: str | Path) -> bool:
    """Whether ``path`` is a CLT run folder (holding ``clt/``) or a CLT folder."""
    from mechfaith.coders.clt_files import find_clt_folder

    return find_clt_folder(path) is not None


def run_train_clt(args: argparse.Namespace, lm_cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig,
                  train_cfg: TrainConfig, *, progress: bool) -> int:
    """Train a CLT over ``args.layers`` into ``args.out`` and print its summary."""
    from mechfaith.lm.clt_train import CLT_RUN_NAMES, train_clt_block

    if args.layers is None:
        raise ConfigError("--clt needs --layers (a contiguous block such as 10-15)")
    if args.activations is not None:
        raise ConfigError("--clt trains straight from the model's stream; --activations does not apply")
    with run_output(args.out, CLT_RUN_NAMES, "CLT run", overwrite=args.overwrite, resume=args.resume) as out:
        r = train_clt_block(lm_cfg, corpus_cfg, coder_cfg, train_cfg, out, args.layers, reach=args.reach,
                            resume=args.resume, progress=progress)
        m = r.final_train_metrics
        print(f"trained a CLT of {r.model} layers {r.layers[0]}-{r.layers[-1]} ({r.n_parameters:,} parameters): "
              f"{r.steps} steps, {r.tokens} tokens; train FVE {fmt_value(m.get('fve'), spec='.4f')}, "
              f"L0 {fmt_value(m.get('l0'), spec='.1f')} per layer ({fmt_value(m.get('l0_token'), spec='.1f')} per "
              f"token), dead {fmt_value(m.get('dead_frac'), spec='.3f')}; train {r.train_seconds:.0f} s")
        if args.eval:
            print_clt_eval(args, lm_cfg, corpus_cfg, out, None)
    print(f"wrote {Path(args.out) / 'clt'} and {Path(args.out) / 'train.json'}")
    sys.stdout.flush()
    return 0


def print_clt_eval(args: argparse.Namespace, lm_cfg: LMConfig, corpus_cfg: CorpusConfig | None, path: str | Path,
                   out: str | None) -> int:
    """Evaluate the CLT at ``path`` and print the result."""
    from mechfaith.lm.clt_eval import evaluate_clt
    from mechfaith.lm.config import MASSIVE_RATIO

    keep_massive = getattr(args, "keep_massive", None)
    e = evaluate_clt(path, lm_cfg, corpus_cfg, keep_bos=not getattr(args, "splice_bos", False),
                     keep_massive=MASSIVE_RATIO if keep_massive is None else keep_massive, out=out,
                     progress=not getattr(args, "quiet", False))
    print(f"CLT of {e.model} layers {e.layers[0]}-{e.layers[-1]} on {e.eval_tokens} held-out tokens ({e.eval_source}):")
    print(f"  CE clean {e.ce_clean:.4f}  spliced {e.ce_spliced:.4f} ({e.ce_increase:+.4f}, KL {e.kl_spliced:.4f})  "
          f"block zero-ablated {e.ce_zero_ablated:.4f}; loss recovered {100 * e.loss_recovered:.1f}%; "
          f"L0 {e.l0_token:.1f} per token over the block")
    print("  layer    FVE     L0   dead")
    for p in e.per_layer:
        print(f"  {p.layer:5d}  {p.fve:.3f}  {p.l0:5.1f}  {p.dead_fraction:.3f}")
    return 0
