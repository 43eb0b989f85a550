"""``mechfaith train``: train a transcoder on a built-in synthetic task (a demo of the trainer).

The task: inputs x ~ sparse Gaussian in R^d_in, target y = MLP(x) for a fixed random GELU MLP
(d_in -> 4 d_in -> d_out); the MLP is also the reference for Jacobian matching (``--jacobian-coef``).
Writes ``--out``/coder (a coder folder), train.jsonl (metrics log), train.json (summary) and, with
``--checkpoint-every``, resumable checkpoints (``--resume``). For language models see ``mechfaith lm train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mechfaith.atomic import write_text_atomic
from mechfaith.cli.arg_types import finite_float
from mechfaith.cli.dataclass_args import add_dataclass_args, dataclass_from_args, load_config_sections
from mechfaith.cli.out_guard import add_overwrite_option, run_output
from mechfaith.coders import CoderConfig, build_coder
from mechfaith.coders.files import save_coder
from mechfaith.configs import config_to_dict
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.training import TrainConfig, Trainer
from mechfaith.training.checkpoint import is_checkpoint
from mechfaith.training.demo import TASK_NAME, demo_reference, demo_stream

CHECKPOINT_DIR = "checkpoint"
OWN_NAMES = ("coder", "train.json", "train.jsonl", CHECKPOINT_DIR)  # what a demo run writes into --out
SMALL_CODER = 1 << 16  # d_in * n_latents at or below which the demo trains on one thread
DEMO_CODER = {"d_in": 32, "n_latents": 256, "activation": "topk", "k": 8}
DEMO_TRAIN = {"n_steps": 600, "batch_size": 256, "lr": 3e-3, "sparsity": "none", "log_every": 50,
              "checkpoint_every": 0, "dead_window": 20000}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a transcoder on a built-in synthetic task (demo)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--config", default=None,
                   help="TOML/YAML/JSON file with [coder] and [train] sections")
    p.add_argument("--density", type=finite_float, default=0.2, help="fraction of non-zero input coordinates")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out (OUT/checkpoint)")
    add_overwrite_option(p)
    p.add_argument("--quiet", action="store_true", help="hide the progress bar")
    add_dataclass_args(p.add_argument_group("coder"), CoderConfig, defaults=DEMO_CODER)
    add_dataclass_args(p.add_argument_group("training"), TrainConfig, defaults=DEMO_TRAIN)
    p.set_defaults(func=run)


class _DropDivergence(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "diverged" in record.getMessage())


def _sections(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    sections = load_config_sections(path, ("coder", "train"))
    return sections["coder"], sections["train"]


def run(args: argparse.Namespace) -> int:
    if not 0 < args.density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {args.density}")
    file_coder, file_train = _sections(args.config)
    ccfg = dataclass_from_args(CoderConfig, args, file_values={**DEMO_CODER, **file_coder})
    tcfg = dataclass_from_args(TrainConfig, args, file_values={**DEMO_TRAIN, **file_train})
    if args.resume and not is_checkpoint(Path(args.out) / CHECKPOINT_DIR):
        raise ConfigError(f"--resume: no checkpoint in {Path(args.out) / CHECKPOINT_DIR} (nothing to resume; "
                          f"start without --resume)")
    with run_output(args.out, OWN_NAMES, "demo run", overwrite=args.overwrite, resume=args.resume) as out:
        if tcfg.device == "cpu" and "OMP_NUM_THREADS" not in os.environ \
                and ccfg.d_in * ccfg.n_latents <= SMALL_CODER:
            # A tiny coder gains nothing from a thread pool, and on a busy machine the pool's threads wait
            # for each other: measured 2.5 s with one thread vs 89 s with two on a loaded 2-core machine.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return _train(args, ccfg, tcfg, out)
            finally:
                torch.set_num_threads(threads)
        return _train(args, ccfg, tcfg, out)


def _train(args: argparse.Namespace, ccfg: CoderConfig, tcfg: TrainConfig, out: Path) -> int:
    reference = demo_reference(ccfg.d_in, int(ccfg.d_out))  # type: ignore[arg-type]
    coder = build_coder(ccfg, seed=tcfg.seed)
    stream = demo_stream(ccfg.d_in, args.density, tcfg.batch_size, tcfg.seed)
    ckpt = out / CHECKPOINT_DIR if tcfg.checkpoint_every > 0 or args.resume else None
    trainer = Trainer(coder, tcfg, reference=reference, log_path=out / "train.jsonl",
                      checkpoint_dir=ckpt, progress=not args.quiet, desc="demo")  # checks the pair: before any write
    out.mkdir(parents=True, exist_ok=True)
    # The trainer logs a divergence as an ERROR; the CLI reports it itself as its one error line.
    trainer_log = logging.getLogger("mechfaith.training.engine")
    hide_divergence = _DropDivergence()
    trainer_log.addFilter(hide_divergence)
    try:
        result = trainer.fit(stream, resume=bool(args.resume))
    finally:
        trainer_log.removeFilter(hide_divergence)
    summary = {"status": result.status, "steps": result.steps_done, "tokens": result.tokens_seen,
               "elapsed_s": result.elapsed_s, "final_metrics": result.final_metrics,
               "coder_config": config_to_dict(ccfg), "train_config": config_to_dict(tcfg),
               "task": {"name": TASK_NAME, "density": args.density}}
    if not result.ok:  # no coder from this run; one left in the folder is an earlier run's: say so
        summary["coder"] = None
        if (out / "coder").exists():
            summary["note"] = f"{out / 'coder'} is an earlier run's coder, not this run's (which diverged)"
    write_text_atomic(out / "train.json", json.dumps(summary, indent=2, default=str) + "\n")
    if not result.ok:
        raise TrainingDiverged(result.message or "loss became NaN or infinite")
    save_coder(trainer.coder, out / "coder", training={
        "source": "mechfaith train (demo)", "steps": result.steps_done, "tokens": result.tokens_seen,
        "final_metrics": result.final_metrics, "train_config": config_to_dict(tcfg)})
    m = result.final_metrics or {}
    print(f"trained {result.steps_done} steps in {result.elapsed_s:.1f} s: "
          f"FVE {m.get('fve', float('nan')):.3f}, L0 {m.get('l0', float('nan')):.1f}, "
          f"dead {m.get('dead_frac', float('nan')):.1%} -> {Path(args.out) / 'coder'}")
    return 0
