#!/usr/bin/env python
"""A sweep of 8 small coders trained together (one batched model) vs one after another.

Run: ``python benchmarks/bench_sweep.py`` (options: ``--help``; ~5 min on 2 cores).

Sweep: 8 SAEs 576 -> 1152 on the MLP input of a language model's layer, batch 4096 rows,
float32 weights and Adam; (a) ReLU + L1 over 8 L1 coefficients, (b) TopK over k = 8, 16, .., 64.
Two sources of activations, each timed per training step of all 8 coders:

- ``model``: activations computed from the model for each batch (the situation of a sweep on a
  new layer, or training without a disk cache). One after another, every run pays the model's
  forward pass for its batches; the batched sweep pays it once per step.
  Model: a randomly initialised Llama of about SmolLM2-135M's shapes (d_model 576, MLP 1536,
  8 heads, 4 KV heads), run up to the collected layer (``--layer``, default 3: 4 blocks) on
  32 contexts of 129 tokens (BOS left out: 4096 rows).
- ``cache``: the batch is already in memory (an activation cache in RAM): compute only.

Sequential = 8 x (activations + ``Trainer.step``); batched = activations + ``StackTrainer.step``
(float32, and bf16 autocast where the CPU supports it). Each repetition times all variants back
to back (interleaved); medians per round, then median and range over rounds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

from mechfaith.coders import CoderConfig, build_coder
from mechfaith.coders.sparse_decode import enable_sparse_decode
from mechfaith.perf import tune_malloc
from mechfaith.training import TrainConfig, Trainer
from mechfaith.training.stack import CoderStack, StackMember
from mechfaith.training.stack_trainer import StackTrainer, bf16_supported


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--latents", type=int, default=1152)
    p.add_argument("--size", type=int, default=8, help="coders in the sweep")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-mlp", type=int, default=1536)
    p.add_argument("--contexts", type=int, default=32)
    p.add_argument("--ctx-len", type=int, default=129)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", default="relu,topk")
    p.add_argument("--device", default="cpu", help="cpu or cuda (model, coders and sweeps)")
    args = p.parse_args(argv)
    dev = args.device
    tuned = tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mechfaith.lm.activations import iter_model_activations
    from mechfaith.lm.models import random_model

    D, N, S = args.d, args.latents, args.size
    lm = random_model("llama", n_layers=args.layer + 1, d_model=D, d_mlp=args.d_mlp, n_heads=args.heads,
                      vocab_size=49152, max_positions=args.ctx_len + 1, seed=0)
    lm.model.eval().to(dev)
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(2, 49152, (args.contexts, args.ctx_len), generator=g)
    contexts[:, 0] = 0

    def activations() -> torch.Tensor:
        batch = next(iter_model_activations(lm.model, contexts, [args.layer], batch_contexts=args.contexts))
        return batch[args.layer][0]  # x [rows, d], on the model's device

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
        if not dev.startswith("cuda"):
            return fn
        return lambda: (fn(), torch.cuda.synchronize())

    x_cached = activations()
    B = x_cached.shape[0]
    tcfg = TrainConfig(n_steps=10**9, batch_size=B, lr=1e-4, lr_warmup_steps=0, lr_decay="none",
                       log_every=10**9, checkpoint_every=0, grad_clip=1.0, device=dev)
    load = os.getloadavg()
    gpu = f"  {torch.cuda.get_device_name()}" if dev.startswith("cuda") else ""
    print(f"# bench_sweep  {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  {os.cpu_count()} CPUs{gpu}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}  device {dev}  malloc tuned {tuned}  "
          f"load avg {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"# {S} SAEs {D} -> {N}, batch {B}; activations: Llama (SmolLM2-135M shapes) layer {args.layer} "
          f"mlp_in, {args.contexts} x {args.ctx_len} tokens")
    bf16 = bf16_supported(dev)
    results = []
    for kind in args.only.split(","):
        if kind == "relu":
            coefs = [1e-4 * 2 ** i for i in range(S)]
            members = [StackMember(sparsity_coef=c) for c in coefs]
            base = CoderConfig(d_in=D, n_latents=N, kind="sae")
            tc = TrainConfig(**{**tcfg.__dict__, "sparsity": "l1"})
            singles = [Trainer(build_coder(base, seed=i), TrainConfig(**{**tc.__dict__, "sparsity_coef": c}),
                               progress=False) for i, c in enumerate(coefs)]
        else:
            ks = [8 * (i + 1) for i in range(S)]
            members = [StackMember(k=k) for k in ks]
            base = CoderConfig(d_in=D, n_latents=N, kind="sae", activation="topk", k=max(ks), decoder_norm="unit")
            tc = TrainConfig(**{**tcfg.__dict__, "sparsity": "none"})
            singles = [Trainer(enable_sparse_decode(build_coder(CoderConfig(**{**base.__dict__, "k": k}), seed=i)),
                               tc, progress=False) for i, k in enumerate(ks)]
        sweeps = {"batched": StackTrainer(CoderStack.from_members(base, members), tc, members=members,
                                             progress=False)}
        if bf16:
            sweeps["batched_bf16"] = StackTrainer(CoderStack.from_members(base, members), tc, members=members,
                                                  mixed_precision="bf16",
                                                  progress=False)
        variants: dict[str, Callable[[], Any]] = {
            "fwd": activations,
            "seq_model": lambda: [t.step(activations()) for t in singles],
            "seq_cache": lambda: [t.step(x_cached) for t in singles],
        }
        for name, sw in sweeps.items():
            variants[f"{name}_model"] = (lambda s=sw: s.step(activations()))
            variants[f"{name}_cache"] = (lambda s=sw: s.step(x_cached))
        variants = {k: synced(fn) for k, fn in variants.items()}
        for fn in variants.values():
            fn()
        rows = []
        print(f"({kind}) sweep of {S}: per training step of all {S} coders, ms")
        for r in range(args.rounds):
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.reps):
                for k, fn in variants.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(med)
            print(f"  round {r + 1}: " + "  ".join(f"{k} {v:.0f}" for k, v in med.items()), flush=True)

        def ratio(num: str, den: str) -> str:
            vals = [row[num] / row[den] for row in rows]
            return f"{statistics.median(vals):.2f} (range {min(vals):.2f}-{max(vals):.2f})"

        results.append(f"({kind}) model forward {statistics.median(r['fwd'] for r in rows):.0f} ms per batch")
        results.append(f"    activations from the model: sequential / batched = {ratio('seq_model', 'batched_model')}"
                       f"   target >= 3" + (f"; / batched bf16 = {ratio('seq_model', 'batched_bf16_model')}" if bf16 else ""))
        results.append(f"    activations in memory:      sequential / batched = {ratio('seq_cache', 'batched_cache')}"
                       + (f"; / batched bf16 = {ratio('seq_cache', 'batched_bf16_cache')}" if bf16 else ""))
    print("summary (median over rounds, range in brackets):")
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
