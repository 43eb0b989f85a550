"""One rank of ``test_layer_set_distributed`` (``python -m torch.distributed.run --nproc_per_node 2
-m tests.lm.set_ranks_worker ROOT CORPUS_SOURCE``, from the repository root).

Every set here is trained on a 3-layer random Llama (rank 0 gets layers 0-1, rank 1 layer 2):

1. ``streamed``: the command line, ``mechfaith -q lm train --layers all`` (``cli.main.main``, what
   ``python -m mechfaith`` runs), which starts the process group from torchrun's environment;
2. ``cached``: ``train_set`` from the activation cache ``ROOT/acts`` (collected by the test);
3. ``stopped``: rank 1 is interrupted at step 6 (its last checkpoint is step 4), rank 0 finishes;
4. ``resumed``: the stopped set resumed by both ranks;
5. ``diverged``: layer 2 (rank 1) diverges at step 3;
6. ``clt``: a cross-layer transcoder over all 3 layers, trained data-parallel (``train_clt_block``).

What each rank returned or raised goes to ``ROOT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mechfaith.cli.main import main
from mechfaith.lm import model_cache
from mechfaith.lm.clt_train import train_clt_block
from mechfaith.lm.config import LMCoderConfig, LMConfig, lm_train_config
from mechfaith.lm.corpus import CorpusConfig
from mechfaith.lm.layer_set import train_set
from mechfaith.lm.model_stream import ModelActivationStream
from mechfaith.lm.models import random_model
from mechfaith.training.engine import EngineMember

N_LAYERS = 3
MODEL_KEY = ("random-llama", "cpu", "float32")
CFG = LMConfig(model="random-llama", train_tokens=1200, eval_contexts=4, batch_contexts=8, stream_block_tokens=200)
CODER = LMCoderConfig(k=4, expansion=2)
TRAIN = dict(n_steps=10, batch_size=64, log_every=5, checkpoint_every=4, jacobian_coef=0.01)


def corpus_config(source: str) -> CorpusConfig:
    return CorpusConfig(source=source, context_length=24, val_fraction=0.34)


def cli_args(out: Path, source: str) -> list[str]:
    """``lm train --layers all`` with the settings of :data:`CFG`, :data:`CODER` and :data:`TRAIN`."""
    flags = ["--model", CFG.model, "--train-tokens", "1200", "--eval-contexts", "4", "--batch-contexts", "8",
             "--stream-block-tokens", "200", "--corpus-source", source, "--corpus-context-length", "24",
             "--corpus-val-fraction", "0.34", "--k", "4", "--expansion", "2"]
    flags += [x for k, v in TRAIN.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return ["-q", "lm", "train", "--layers", "all", "--out", str(out), *flags]


def _attempt(report: dict[str, Any], name: str, out: Path, source: str, **kw: Any) -> None:
    try:
        res = train_set(CFG, corpus_config(source), CODER, lm_train_config(**TRAIN), out, "all", progress=False,
                        **kw)
        report[name] = {"ok": True, "result": res.to_json()}
    except BaseException as exc:  # noqa: BLE001 -- what each rank raised is the point
        report[name] = {"error": type(exc).__name__, "message": str(exc)}


def run(root: Path, source: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    model_cache._MODELS[MODEL_KEY] = random_model("llama", n_layers=N_LAYERS)
    report: dict[str, Any] = {"streamed": {"exit": main(cli_args(root / "streamed", source))}}
    _attempt(report, "cached", root / "cached", source, activations=root / "acts")
    real_next, real_nonfinite, calls = ModelActivationStream.next_batch, EngineMember.nonfinite, [0]

    def stop_after_five(self: ModelActivationStream) -> Any:
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt
        return real_next(self)

    if rank == 1:
        ModelActivationStream.next_batch = stop_after_five  # type: ignore[method-assign]
    _attempt(report, "stopped", root / "stopped", source)
    ModelActivationStream.next_batch = real_next  # type: ignore[method-assign]
    _attempt(report, "resumed", root / "stopped", source, resume=True)
    if rank == 1:
        EngineMember.nonfinite = lambda self, got: "loss nan (forced)" if self.step_count >= 2 else None
    _attempt(report, "diverged", root / "diverged", source)
    EngineMember.nonfinite = real_nonfinite  # type: ignore[method-assign]
    try:
        r = train_clt_block(CFG, corpus_config(source), CODER, lm_train_config(**TRAIN), root / "clt", "all",
                            progress=False)
        report["clt"] = {"ok": True, "steps": r.steps, "tokens": r.tokens}
    except BaseException as exc:  # noqa: BLE001
        report["clt"] = {"error": type(exc).__name__, "message": str(exc)}
    (root / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2])
