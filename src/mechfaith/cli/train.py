"""``mechfaith train``: train a transcoder on a built-in synthetic task (a demo of the trainer).

The task: inputs x ~ sparse Gaussian in R^d_in, target y = MLP(x) for a fixed random GELU MLP
(d_in -> 4 d_in -> d_out); the MLP is also the reference for Jacobian matching (``--jacobian-coef``).
Writes ``--out``/coder (a coder folder), train.jsonl (metrics log), train.json (summary) and, with
``--checkpoint-every``, resumable checkpoints (``--resume``). For language models see ``mechfaith lm train``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mechfaith.atomic import write_text_atomic
from mechfaith.cli.dataclass_args import add_dataclass_args, dataclass_from_args, load_config_file
from mechfaith.coders import CoderConfig, build_coder
from mechfaith.coders.files import save_coder
from mechfaith.configs import config_to_dict
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.training import FunctionStream, TrainConfig, Trainer

DEMO_CODER = {"d_in": 32, "n_latents": 256, "activation": "topk", "k": 8}
DEMO_TRAIN = {"n_steps": 600, "batch_size": 256, "lr": 3e-3, "sparsity": "none", "log_every": 50,
              "checkpoint_every": 0, "dead_window": 20000}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a transcoder on a built-in synthetic task (demo)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--config", default=None,
                   help="TOML/YAML/JSON file with [coder] and [train] sections")
    p.add_argument("--density", type=float, default=0.2, help="fraction of non-zero input coordinates")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="hide the progress bar")
    add_dataclass_args(p.add_argument_group("coder"), CoderConfig)
    add_dataclass_args(p.add_argument_group("training"), TrainConfig)
    p.set_defaults(func=run)


def demo_reference(d_in: int, d_out: int, seed: int = 1234) -> nn.Module:
    """The fixed random GELU MLP the demo transcoder learns."""
    gen = torch.Generator().manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(d_in, 4 * d_in), nn.GELU(), nn.Linear(4 * d_in, d_out))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.5)
    for p in mlp.parameters():
        p.requires_grad_(False)
    return mlp


def _sections(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path:
        return {}, {}
    data = load_config_file(path)
    unknown = sorted(set(data) - {"coder", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (expected [coder], [train])")
    coder, train = data.get("coder", {}), data.get("train", {})
    if not isinstance(coder, dict) or not isinstance(train, dict):
        raise ConfigError(f"{path}: [coder] and [train] must be tables of options")
    return coder, train


def run(args: argparse.Namespace) -> int:
    if not 0 < args.density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {args.density}")
    file_coder, file_train = _sections(args.config)
    ccfg = dataclass_from_args(CoderConfig, args, file_values={**DEMO_CODER, **file_coder})
    tcfg = dataclass_from_args(TrainConfig, args, file_values={**DEMO_TRAIN, **file_train})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = demo_reference(ccfg.d_in, int(ccfg.d_out))  # type: ignore[arg-type]
    density = args.density

    def batch(gen: torch.Generator, n: int) -> tuple[Tensor, Tensor | None]:
        x = torch.randn(n, ccfg.d_in, generator=gen)
        x = x * (torch.rand(n, ccfg.d_in, generator=gen) < density)
        return x, None  # the target comes from the reference

    coder = build_coder(ccfg, seed=tcfg.seed)
    stream = FunctionStream(batch, batch_size=tcfg.batch_size, seed=tcfg.seed)
    ckpt = out / "checkpoint" if tcfg.checkpoint_every > 0 else None
    trainer = Trainer(coder, tcfg, reference=reference, log_path=out / "train.jsonl",
                      checkpoint_dir=ckpt, progress=not args.quiet, desc="demo")
    result = trainer.fit(stream, resume="auto" if args.resume else False)
    summary = {"status": result.status, "steps": result.steps_done, "tokens": result.tokens_seen,
               "elapsed_s": result.elapsed_s, "final_metrics": result.final_metrics,
               "coder_config": config_to_dict(ccfg), "train_config": config_to_dict(tcfg),
               "task": {"name": "demo-gelu-mlp", "density": density}}
    write_text_atomic(out / "train.json", json.dumps(summary, indent=2, default=str) + "\n")
    if not result.ok:
        raise TrainingDiverged(result.message or "loss became NaN or infinite")
    save_coder(trainer.coder, out / "coder", training={
        "source": "mechfaith train (demo)", "steps": result.steps_done, "tokens": result.tokens_seen,
        "final_metrics": result.final_metrics, "train_config": config_to_dict(tcfg)})
    m = result.final_metrics or {}
    print(f"trained {result.steps_done} steps in {result.elapsed_s:.1f} s: "
          f"FVE {m.get('fve', float('nan')):.3f}, L0 {m.get('l0', float('nan')):.1f}, "
          f"dead {m.get('dead_frac', float('nan')):.1%} -> {out / 'coder'}")
    return 0
