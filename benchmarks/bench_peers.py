#!/usr/bin/env python
"""mechfaith vs SAELens (sae-lens) vs EleutherAI sparsify (eai-sparsify): one training step, side by side.

Run (after ``bash benchmarks/setup_peers.sh``, which builds the benchmark venv):

    PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/bench_peers.py            # ~5-10 min on 2 cores
    PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/bench_peers.py --help

Configurations (SAEs: the target is the input; float32; batch 4096 of the same random inputs for
everyone; every step is forward + loss + backward + gradient-norm clipping at 1.0 +
``torch.optim.Adam(fused=True)`` step + the trainer's fired-latent bookkeeping):

(a) ReLU + L1, 576 -> 4608: mechfaith ``Trainer.step`` vs SAELens ``StandardTrainingSAE``
    (``training_forward_pass``). sparsify trains TopK/GroupMax coders only: no ReLU + L1.
(b) TopK k = 32, 576 -> 4608, unit-norm decoder rows: mechfaith ``Trainer.step`` on a
    ``SparseDecodeCoder`` (sparse decoder and encoder backward) and on the dense fused coder, vs
    SAELens ``TopKTrainingSAE`` (dense activations, its default, and ``use_sparse_activations``)
    and sparsify ``SparseCoder`` (its eager CPU path: ``embedding_bag`` decoder, ``index_add``
    encoder backward; the Triton kernels need a GPU).
(c) a sweep of 8 coders 576 -> 1152 (ReLU + L1, 8 L1 coefficients): mechfaith ``StackTrainer``
    (one batched model, float32 and bf16 autocast) vs 8 mechfaith ``Trainer.step`` one after
    another, vs 8 SAELens steps; and a TopK sweep over 8 values of k: mechfaith batched vs 8
    mechfaith sparse-TopK steps vs 8 sparsify steps. (Neither peer has a batched sweep; on the
    same in-memory batch this measures compute only, see bench_sweep.py for the stream's share.)

Also: this machine's matmul rate (``torch.mm`` 4096 x 576 x 4608, float32 and bfloat16) and each
mechfaith step's achieved FLOP/s (matmul FLOPs the step needs) as a fraction of it.

Every contender runs once per repetition, interleaved, so load from other processes hits all
alike. The machine may be shared: ratios are computed per round from each contender's fastest
repetition (the least disturbed), and the summary gives their median and range over rounds, plus
the ratios of median wall times and of process CPU times.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch

warnings.filterwarnings("ignore")

from mechfaith.coders import CoderConfig, build_coder  # noqa: E402
from mechfaith.coders.sparse_decode import enable_sparse_decode  # noqa: E402
from mechfaith.perf import tune_malloc  # noqa: E402
from mechfaith.training import TrainConfig, Trainer  # noqa: E402
from mechfaith.training.stack import CoderStack, StackMember  # noqa: E402
from mechfaith.training.stack_trainer import StackTrainer, bf16_supported  # noqa: E402

Step = Callable[[], Any]
DEVICE = "cpu"  # --device: where every contender's tensors live; CUDA timings wait for the device


def _adam(params) -> torch.optim.Adam:
    return torch.optim.Adam(list(params), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=True)


def _mf_cfg(**kw) -> TrainConfig:
    base = dict(n_steps=10**9, batch_size=4096, lr=1e-4, lr_warmup_steps=0, lr_decay="none", grad_clip=1.0,
                log_every=10**9, checkpoint_every=0, device=DEVICE)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- mechfaith
def mf_relu(x, d, n, coef) -> Step:
    tr = Trainer(build_coder(CoderConfig(d_in=d, n_latents=n, kind="sae"), seed=0),
                 _mf_cfg(sparsity="l1", sparsity_coef=coef), progress=False)
    return lambda: tr.step(x)


def mf_topk(x, d, n, k, sparse: bool) -> Step:
    coder = build_coder(CoderConfig(d_in=d, n_latents=n, kind="sae", activation="topk", k=k,
                                    decoder_norm="unit"), seed=0)
    if sparse:
        enable_sparse_decode(coder)
    tr = Trainer(coder, _mf_cfg(sparsity="none"), progress=False)
    return lambda: tr.step(x)


def mf_sweep(x, d, n, members, activation, sparsity, bf16: bool) -> Step:
    base = CoderConfig(d_in=d, n_latents=n, kind="sae", activation=activation, k=max(m.k or 1 for m in members),
                       decoder_norm="unit" if activation == "topk" else "penalty")
    tr = StackTrainer(CoderStack.from_members(base, members), _mf_cfg(sparsity=sparsity), members=members,
                      mixed_precision="bf16" if bf16 else "no", progress=False)
    return lambda: tr.step(x)


# ---------------------------------------------------------------------------------------------- SAELens
def saelens_step(sae, x, coefs: dict[str, float]) -> Step:
    from sae_lens.saes.sae import TrainStepInput

    opt = _adam(sae.parameters())
    sae.to(DEVICE)
    since = torch.zeros(sae.cfg.d_sae, device=DEVICE)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=DEVICE)
    state = {"i": 0}

    def step():
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefs, dead_neuron_mask=dead,
                                                       n_training_steps=state["i"], is_logging_step=False))
        with torch.no_grad():  # what SAELens's trainer does each step
            fired = out.feature_acts.bool().float()
            did = fired.sum(-2).bool()
            if did.is_sparse:
                did = did.to_dense()
            since.add_(1)
            since[did] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["i"] += 1
        return float(out.loss)

    return step


def sl_relu(x, d, n, coef) -> Step:
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=n, l1_coefficient=coef))
    return saelens_step(sae, x, {"l1": coef})


def sl_topk(x, d, n, k, sparse: bool) -> Step:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, use_sparse_activations=sparse))
    return saelens_step(sae, x, {})


# ---------------------------------------------------------------------------------------------- sparsify
def sp_topk(x, d, n, k) -> Step:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=DEVICE)
    opt = _adam(sae.parameters())
    since = torch.zeros(n, dtype=torch.long, device=DEVICE)

    def step():
        sae.set_decoder_norm_to_unit_norm()
        dead = since > 10_000_000
        out = sae(x, dead_mask=dead)
        loss = out.fvu + (1 / 32) * out.auxk_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            did = torch.zeros(n, dtype=torch.bool, device=DEVICE)
            did[out.latent_indices.flatten()] = True
            since.add_(x.shape[0])
            since[did] = 0
        return float(loss)

    return step


def matmuls(B: int, d: int, n: int, which: str = "step") -> Step:
    """The dense matmuls a step needs, as bare ``torch.mm`` into preallocated outputs: the machine's
    rate for exactly these shapes. ``step``: x W_enc, f W_dec, f^T g, g W_dec^T, x^T g (ReLU step);
    ``enc``: x W_enc only (the sparse TopK step's one dense product)."""
    g = torch.Generator().manual_seed(1)
    x, w_enc, w_dec = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((B, d), (d, n), (n, d)))
    f, gy = torch.randn(B, n, generator=g).to(DEVICE), torch.randn(B, d, generator=g).to(DEVICE)
    o_bn, o_bd, o_nd, o_dn = (torch.empty(*shape, device=DEVICE) for shape in ((B, n), (B, d), (n, d), (d, n)))
    if which == "enc":
        return lambda: torch.mm(x, w_enc, out=o_bn)

    def five():
        torch.mm(x, w_enc, out=o_bn)
        torch.mm(f, w_dec, out=o_bd)
        torch.mm(f.T, gy, out=o_nd)
        torch.mm(gy, w_dec.T, out=o_bn)
        torch.mm(x.T, f, out=o_dn)

    return five


def seq(steps: list[Step]) -> Step:
    return lambda: [s() for s in steps]


# ---------------------------------------------------------------------------------------------- timing
def time_once(fn: Step) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


FAILED: dict[str, str] = {}


def measure(contenders: dict[str, Step], rounds: int, reps: int, warmup: int) -> list[dict[str, float]]:
    """Per round: ``name`` (median wall ms), ``name:min`` (fastest wall ms), ``name:cpu`` (median
    process CPU ms). A contender whose first step raises is dropped (reason in FAILED)."""
    for name, fn in list(contenders.items()):
        try:
            for _ in range(max(1, warmup)):
                fn()
        except Exception as exc:  # a peer that cannot run this configuration here
            FAILED[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            print(f"  {name} cannot run here: {FAILED[name]}", flush=True)
            del contenders[name]
    out = []
    for r in range(rounds):
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
        for _ in range(reps):
            for k, fn in contenders.items():
                times[k].append(time_once(fn))
        row: dict[str, float] = {}
        for k, v in times.items():
            row[k] = statistics.median(w for w, _ in v) * 1e3
            row[k + ":min"] = min(w for w, _ in v) * 1e3
            row[k + ":cpu"] = statistics.median(c for _, c in v) * 1e3
        out.append(row)
        print(f"  round {r + 1} (median/min wall ms): "
              + "  ".join(f"{k} {row[k]:.0f}/{row[k + ':min']:.0f}" for k in contenders), flush=True)
    return out


def summary(rows: list[dict[str, float]], num: str, den: str) -> str:
    """Ratio time(num) / time(den): fastest repetitions (median over rounds, range), also by median
    wall time and by process CPU time."""
    def stat(suffix: str) -> list[float]:
        return [row[num + suffix] / row[den + suffix] for row in rows]
    best = stat(":min")
    return (f"{statistics.median(best):.2f} (range {min(best):.2f}-{max(best):.2f}); by median wall "
            f"{statistics.median(stat('')):.2f}, by CPU time {statistics.median(stat(':cpu')):.2f}")


def med(rows: list[dict[str, float]], key: str) -> float:
    """The fastest repetition's wall ms, median over rounds."""
    return statistics.median(row[key + ":min"] for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--sweep-latents", type=int, default=1152)
    p.add_argument("--sweep-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--only", default="a,b,c", help="which configurations: a,b,c")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    tuned = tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, D, N, K, S = args.batch, args.d, args.latents, args.k, args.sweep_size
    only = set(args.only.split(","))
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    peers: dict[str, str] = {}
    for mod, dist_name in (("sae_lens", "sae-lens"), ("sparsify", "eai-sparsify")):
        try:
            m = __import__(mod)
            peers[mod] = getattr(m, "__version__", "?")
        except ImportError:
            print(f"# {dist_name} is not installed in this Python: run benchmarks/setup_peers.sh and use its venv")
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"# bench_peers  {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()}  {os.cpu_count()} CPUs  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}  malloc tuned {tuned}  "
          f"load avg {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("# peers: " + ", ".join(f"{k} {v}" for k, v in peers.items()))
    print(f"# batch {B}, float32, Adam(fused) + grad clip 1.0; {args.rounds} rounds x {args.reps} interleaved "
          f"repetitions after {args.warmup} warm-up; ratios = peer time / mechfaith time (> 1: mechfaith faster)")

    # the machine's matmul rate: measured inside each configuration, interleaved with its steps
    a, w = torch.randn(B, D, device=DEVICE), torch.randn(D, N, device=DEVICE)
    ab, wb = a.bfloat16(), w.bfloat16()
    mm = measure({"mm_f32": lambda: torch.mm(a, w), "mm_bf16": lambda: torch.mm(ab, wb)}, 1, 5, 1)
    mm_flops = 2.0 * B * D * N
    print(f"# torch.mm {B}x{D}x{N} now: float32 {mm_flops / med(mm, 'mm_f32') / 1e6:.0f} GFLOP/s, bfloat16 "
          f"{mm_flops / med(mm, 'mm_bf16') / 1e6:.0f} GFLOP/s (bf16 native: {bf16_supported(DEVICE)}); "
          f"the ratios below use the rate measured interleaved with the steps")
    rate32 = mm_flops / (med(mm, "mm_f32") / 1e3)
    results: list[str] = []

    if "a" in only:
        print(f"(a) ReLU + L1, {D} -> {N}")
        c = {"mechfaith": mf_relu(x, D, N, 1e-3), "matmuls": matmuls(B, D, N)}
        if "sae_lens" in peers:
            c["saelens"] = sl_relu(x, D, N, 1e-3)
        rows = measure(c, args.rounds, args.reps, args.warmup)
        flops = 5 * 2.0 * B * D * N
        ach = flops / (med(rows, "mechfaith") / 1e3)
        rate32 = flops / (med(rows, "matmuls") / 1e3)
        results.append(f"(a) ReLU+L1 {D}->{N}: mechfaith {med(rows, 'mechfaith'):.0f} ms/step; achieved "
                       f"{ach / 1e9:.0f} GFLOP/s; matmul roofline (the step's 5 matmuls as bare torch.mm, "
                       f"interleaved) {rate32 / 1e9:.0f} GFLOP/s; step FLOP/s / matmul FLOP/s = "
                       f"{summary(rows, 'matmuls', 'mechfaith')}")
        if "saelens" in c:
            results.append(f"    SAELens / mechfaith = {summary(rows, 'saelens', 'mechfaith')}   target >= 1.0")
        results.append("    sparsify: no ReLU + L1 coder (it trains TopK / GroupMax only)")

    if "b" in only:
        print(f"(b) TopK k={K}, {D} -> {N}")
        c = {"mechfaith": mf_topk(x, D, N, K, sparse=True), "mechfaith_dense": mf_topk(x, D, N, K, sparse=False),
             "matmul_enc": matmuls(B, D, N, "enc")}
        if "sae_lens" in peers:
            c["saelens"] = sl_topk(x, D, N, K, sparse=False)
            c["saelens_sparse"] = sl_topk(x, D, N, K, sparse=True)
        if "sparsify" in peers:
            c["sparsify"] = sp_topk(x, D, N, K)
        rows = measure(c, args.rounds, args.reps, args.warmup)
        need = 2.0 * B * D * N + 4 * 2.0 * B * K * D
        ach = need / (med(rows, "mechfaith") / 1e3)
        results.append(f"(b) TopK k={K} {D}->{N}: mechfaith (sparse decode) {med(rows, 'mechfaith'):.0f} ms/step; "
                       f"dense fused {med(rows, 'mechfaith_dense'):.0f} ms; achieved {ach / 1e9:.0f} GFLOP/s "
                       f"(FLOPs needed: encoder matmul + 4 sparse products of B k d); time of the bare encoder "
                       f"matmul / step = {summary(rows, 'matmul_enc', 'mechfaith')}")
        results.append(f"    dense / sparse mechfaith = {summary(rows, 'mechfaith_dense', 'mechfaith')}")
        if "saelens" in c:
            results.append(f"    SAELens (dense acts, default) / mechfaith = {summary(rows, 'saelens', 'mechfaith')}"
                           f"   target >= 1.5")
        if "saelens_sparse" in c:
            results.append(f"    SAELens (use_sparse_activations) / mechfaith = "
                           f"{summary(rows, 'saelens_sparse', 'mechfaith')}   target >= 1.5")
        elif "saelens_sparse" in FAILED:
            results.append(f"    SAELens (use_sparse_activations) cannot run on CPU: {FAILED['saelens_sparse']}")
        if "sparsify" in c:
            results.append(f"    sparsify / mechfaith = {summary(rows, 'sparsify', 'mechfaith')}   target >= 1.0")

    if "c" in only:
        n = args.sweep_latents
        coefs = [1e-4 * 2 ** i for i in range(S)]
        print(f"(c1) sweep of {S} ReLU + L1 coders {D} -> {n} (L1 coefficients {coefs[0]:g}..{coefs[-1]:g})")
        c = {"batched": mf_sweep(x, D, n, [StackMember(sparsity_coef=v) for v in coefs], "relu", "l1", False),
             "sequential": seq([mf_relu(x, D, n, v) for v in coefs])}
        if bf16_supported(DEVICE):
            c["batched_bf16"] = mf_sweep(x, D, n, [StackMember(sparsity_coef=v) for v in coefs], "relu", "l1", True)
            c["sequential_bf16"] = seq([mf_sweep(x, D, n, [StackMember(sparsity_coef=v)], "relu", "l1", True)
                                        for v in coefs])
        if "sae_lens" in peers:
            c["saelens_seq"] = seq([sl_relu(x, D, n, v) for v in coefs])
        rows = measure(c, args.rounds, max(2, args.reps - 2), args.warmup)
        flops = S * 5 * 2.0 * B * D * n
        results.append(f"(c1) ReLU+L1 sweep of {S} x {D}->{n}: batched {med(rows, 'batched'):.0f} ms/step, "
                       f"{S} sequential Trainer steps {med(rows, 'sequential'):.0f} ms")
        results.append(f"    sequential / batched (float32, same inputs) = {summary(rows, 'sequential', 'batched')}"
                       f"   target >= 3 (see bench_sweep.py for the activation stream's share)")
        results.append(f"    batched achieved {flops / (med(rows, 'batched') / 1e3) / 1e9:.0f} GFLOP/s (float32)")
        if "batched_bf16" in c:
            results.append(f"    bf16 autocast: sequential bf16 / batched bf16 = "
                           f"{summary(rows, 'sequential_bf16', 'batched_bf16')}; sequential float32 Trainer / "
                           f"batched bf16 = {summary(rows, 'sequential', 'batched_bf16')}; batched bf16 achieved "
                           f"{flops / (med(rows, 'batched_bf16') / 1e3) / 1e9:.0f} GFLOP/s")
        if "saelens_seq" in c:
            results.append(f"    {S} sequential SAELens steps / batched = {summary(rows, 'saelens_seq', 'batched')}")
        ks = [8 * (i + 1) for i in range(S)]
        print(f"(c2) sweep of {S} TopK coders {D} -> {n} (k = {ks[0]}..{ks[-1]})")
        c = {"batched": mf_sweep(x, D, n, [StackMember(k=v) for v in ks], "topk", "none", False),
             "sequential": seq([mf_topk(x, D, n, v, sparse=True) for v in ks])}
        if bf16_supported(DEVICE):
            c["batched_bf16"] = mf_sweep(x, D, n, [StackMember(k=v) for v in ks], "topk", "none", True)
        if "sparsify" in peers:
            c["sparsify_seq"] = seq([sp_topk(x, D, n, v) for v in ks])
        if "sae_lens" in peers:
            c["saelens_seq"] = seq([sl_topk(x, D, n, v, sparse=False) for v in ks])
        rows = measure(c, args.rounds, max(2, args.reps - 2), args.warmup)
        results.append(f"(c2) TopK sweep of {S} x {D}->{n}: batched {med(rows, 'batched'):.0f} ms/step, "
                       f"{S} sequential sparse-TopK Trainer steps {med(rows, 'sequential'):.0f} ms")
        results.append(f"    sequential / batched = {summary(rows, 'sequential', 'batched')}")
        if "batched_bf16" in c:
            results.append(f"    sequential float32 / batched bf16 = {summary(rows, 'sequential', 'batched_bf16')}")
        if "sparsify_seq" in c:
            results.append(f"    {S} sequential sparsify steps / batched = {summary(rows, 'sparsify_seq', 'batched')}"
                           + (f"; / batched bf16 = {summary(rows, 'sparsify_seq', 'batched_bf16')}"
                              if "batched_bf16" in c else ""))
        if "saelens_seq" in c:
            results.append(f"    {S} sequential SAELens steps / batched = {summary(rows, 'saelens_seq', 'batched')}")

    print("summary (ratios peer / mechfaith of the fastest repetitions: median over rounds (range); "
          "ms/step: fastest repetition, median over rounds):")
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
