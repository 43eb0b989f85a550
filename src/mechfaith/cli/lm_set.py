"""``mechfaith lm train --layers``: a replacement set (one coder per layer, trained together), also
under torchrun, where the processes share the layers and rank 0 alone prints the summary:

    torchrun --standalone --nproc_per_node 2 -m mechfaith lm train --layers all --out SET ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mechfaith.errors import ConfigError
from mechfaith.lm.config import LMCoderConfig, LMConfig
from mechfaith.lm.corpus import CorpusConfig
from mechfaith.reports.values import fmt_value
from mechfaith.training.config import TrainConfig


def run_train_set(args: argparse.Namespace, lm_cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig,
                  train_cfg: TrainConfig, *, progress: bool) -> int:
    """Train the set of ``args.layers`` into ``args.out`` and print its summary (rank 0 only)."""
    from mechfaith.lm.distributed import is_main_process
    from mechfaith.lm.layer_set import SET_JSON, train_set

    if args.eval:
        raise ConfigError("--eval is not available with --layers yet (evaluate a layer's coder with lm eval "
                          "OUT/layers/L<l>)")
    r = train_set(lm_cfg, corpus_cfg, coder_cfg, train_cfg, args.out, args.layers, activations=args.activations,
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
