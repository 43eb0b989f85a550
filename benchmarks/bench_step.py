#!/usr/bin/env python
"""Speed of one training step of a 576 -> 4608 transcoder at batch 4096 on this CPU.

Run: ``python benchmarks/bench_step.py`` (options: ``--help``). Prints, for several rounds measured
back to back in this one process:

(a) the step's achieved matmul FLOP/s as a fraction of this machine's dense matmul FLOP/s.
    Only the matmul FLOPs the step needs are counted: forward x W_enc and f W_dec (2 matmuls),
    backward grad W_dec = f^T g, grad f = g W_dec^T, grad W_enc = x^T g_pre (3 matmuls; no input
    gradient), 2 * B * d * n FLOPs each. The machine's rate is measured with torch.mm on exactly
    these five shapes and layouts (transposed operands included), into preallocated outputs.
(b) the time of a step with Jacobian matching (1 Gaussian probe per input; reference = a GELU MLP
    576 -> 2304 -> 576, its JVP by torch.func.jvp under training.fast_jvp.linear_jvp_mode) over
    the time of the same step without it.
(b, TopK) the same ratio for a TopK coder (``--topk``, default k = 32; no sparsity penalty, no
    AuxK) of the same size, whose JVP goes through the active latents only
    (``coders.sparse_jvp``); the same JM step with the dense tangent path (``coder.sparse_jvp =
    False``) is timed alongside.

The step is ``mechfaith.training.trainer.Trainer.step``: forward, MSE + L1 sparsity penalty
(+ Jacobian term), backward, gradient norm, fused Adam update, dead-latent bookkeeping. The same
steps with the target taken from the reference (``y = None``) and with the plain-autograd coder
(``coder.fused = False``) are timed alongside. The CPU may be shared, so every measurement kind is
interleaved within each repetition and each round reports medians over ``--reps`` repetitions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

from mechfaith.coders import CoderConfig, build_coder
from mechfaith.perf import tune_malloc
from mechfaith.training.config import TrainConfig
from mechfaith.training.trainer import Trainer

DEVICE = "cpu"  # --device; on CUDA every timing waits for the device (torch.cuda.synchronize)


def time_once(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def matmul_suite(batch: int, d: int, n: int) -> list[tuple[str, Callable[[], object], float]]:
    """The five matmuls of a training step, as torch.mm calls with preallocated outputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=g).to(DEVICE)
    w_enc = torch.randn(d, n, generator=g).to(DEVICE)
    w_dec = torch.randn(n, d, generator=g).to(DEVICE)
    f = torch.randn(batch, n, generator=g).to(DEVICE)
    gy = torch.randn(batch, d, generator=g).to(DEVICE)
    o_bn, o_bd = torch.empty(batch, n, device=DEVICE), torch.empty(batch, d, device=DEVICE)
    o_nd, o_dn = torch.empty(n, d, device=DEVICE), torch.empty(d, n, device=DEVICE)
    flops = 2.0 * batch * d * n
    return [
        ("fwd  x W_enc        ", lambda: torch.mm(x, w_enc, out=o_bn), flops),
        ("fwd  f W_dec        ", lambda: torch.mm(f, w_dec, out=o_bd), flops),
        ("bwd  f^T g (W_dec)  ", lambda: torch.mm(f.T, gy, out=o_nd), flops),
        ("bwd  g W_dec^T (f)  ", lambda: torch.mm(gy, w_dec.T, out=o_bn), flops),
        ("bwd  x^T g (W_enc)  ", lambda: torch.mm(x.T, f, out=o_dn), flops),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--latents", type=int, default=4608)
    p.add_argument("--hidden", type=int, default=2304, help="reference GELU MLP width")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all measurements, back to back")
    p.add_argument("--reps", type=int, default=5, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the matmul roofline is then the GPU's)")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc malloc as it is (see mechfaith.perf.tune_malloc)")
    p.add_argument("--no-plain", action="store_true",
                   help="skip the plain-autograd coder (coder.fused = False) for comparison")
    p.add_argument("--no-ref-target", action="store_true",
                   help="skip the steps whose target is the reference's output")
    p.add_argument("--topk", type=int, default=32,
                   help="k of the TopK coder whose (b) is also measured (0: no TopK rows)")
    p.add_argument("--no-topk-dense", action="store_true",
                   help="skip the TopK JM step with the dense tangent path (coder.sparse_jvp = False)")
    p.add_argument("--no-relu", action="store_true",
                   help="skip the ReLU coder's steps and (a) (TopK rows only; needs --topk > 0)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device

    tuned = False if args.no_tune_malloc else tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, D, N, H = args.batch, args.d, args.latents, args.hidden
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)).requires_grad_(False).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g).to(DEVICE)
    with torch.no_grad():
        y = reference(x)  # the target is given (as from an activation cache)

    ccfg = CoderConfig(d_in=D, n_latents=N, activation="relu")
    base_cfg = TrainConfig(n_steps=10**9, batch_size=B, lr=1e-4, lr_warmup_steps=0, sparsity="l1",
                           sparsity_coef=1e-3, sparsity_warmup_steps=0, log_every=10**9, device=DEVICE)
    jm_cfg = TrainConfig(**{**base_cfg.__dict__, "jacobian_coef": 1.0, "n_probes": 1})

    def trainer(cfg: TrainConfig, fused: bool = True) -> Trainer:
        coder = build_coder(ccfg, seed=0)
        coder.fused = fused
        return Trainer(coder, cfg, reference=reference, progress=False)

    # name -> a step; "given y": the target comes with the batch (an activation cache);
    # "ref y": the target is the reference's output (its forward without JM, the jvp's primal with JM)
    steps: dict[str, Callable[[], object]] = {}
    if args.no_relu and not args.topk:
        p.error("--no-relu needs --topk > 0")
    if not args.no_relu:
        t = {k: trainer(c) for k, c in (("base", base_cfg), ("jm", jm_cfg))}
        steps["base"] = lambda: t["base"].step(x, y)
        steps["jm"] = lambda: t["jm"].step(x, y)
        if not args.no_ref_target:
            steps["base_refy"] = lambda: t["base"].step(x, None)
            steps["jm_refy"] = lambda: t["jm"].step(x, None)
        if not args.no_plain:
            tp = {k: trainer(c, fused=False) for k, c in (("base", base_cfg), ("jm", jm_cfg))}
            steps["plain_base"] = lambda: tp["base"].step(x, y)
            steps["plain_jm"] = lambda: tp["jm"].step(x, y)
    if args.topk:
        # TopK coder: JM's coder JVP through the k active latents (coders.sparse_jvp, the default)
        tk_ccfg = CoderConfig(d_in=D, n_latents=N, activation="topk", k=args.topk)
        tk_base_cfg = TrainConfig(**{**base_cfg.__dict__, "sparsity": "none", "sparsity_coef": 0.0,
                                     "auxk_coef": 0.0})
        tk_jm_cfg = TrainConfig(**{**tk_base_cfg.__dict__, "jacobian_coef": 1.0, "n_probes": 1})

        def tk_trainer(cfg: TrainConfig, sparse_jvp: bool = True) -> Trainer:
            coder = build_coder(tk_ccfg, seed=0)
            assert coder.sparse_jvp  # the default for TopK
            coder.sparse_jvp = sparse_jvp
            return Trainer(coder, cfg, reference=reference, progress=False)

        tt = {"base": tk_trainer(tk_base_cfg), "jm": tk_trainer(tk_jm_cfg)}
        steps["tk_base"] = lambda: tt["base"].step(x, y)
        steps["tk_jm"] = lambda: tt["jm"].step(x, y)
        if not args.no_ref_target:
            steps["tk_base_refy"] = lambda: tt["base"].step(x, None)
            steps["tk_jm_refy"] = lambda: tt["jm"].step(x, None)
        if not args.no_topk_dense:
            tt["jm_dense"] = tk_trainer(tk_jm_cfg, sparse_jvp=False)
            steps["tk_jm_dense"] = lambda: tt["jm_dense"].step(x, y)

    suite = matmul_suite(B, D, N)
    step_flops = sum(fl for _, _, fl in suite)
    ref_flops = 4 * 2.0 * B * D * H  # torch.func.jvp of the reference: primal + tangent, 2 layers
    jm_flops = 2 * step_flops + ref_flops

    gpu = f"  {torch.cuda.get_device_name()}" if DEVICE.startswith("cuda") else ""
    print(f"# bench_step  {datetime.date.today()}  {platform.machine()}  {os.cpu_count()} CPUs{gpu}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}  device {DEVICE}  "
          f"glibc malloc tuned: {tuned}")
    print(f"# transcoder {D} -> {N} -> {D}, batch {B}, ReLU, L1 penalty, fused Adam, Trainer.step; "
          f"reference GELU MLP {D} -> {H} -> {D}"
          + (f"; TopK k = {args.topk} coder (no penalty, no AuxK), sparse JVP" if args.topk else ""))
    print("# FLOPs counted: matmuls only: forward x W_enc, f W_dec; backward f^T g (grad W_dec), "
          "g W_dec^T (grad f), x^T g_pre (grad W_enc); no input gradient")
    print(f"#   step: 5 x 2*B*d*n = {step_flops / 1e9:.1f} GFLOP; with Jacobian matching: "
          f"{jm_flops / 1e9:.1f} GFLOP (coder JVP doubles the coder's matmuls, reference JVP adds "
          f"4 x 2*B*d*h) -> FLOP ratio {jm_flops / step_flops:.2f}")
    print(f"# each round: {args.warmup} warm-up steps of each kind, then {args.reps} repetitions of "
          f"[5 torch.mm, one step of each kind] interleaved; medians per round")
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    rows: dict[str, list[dict[str, float]]] = {"wall": [], "cpu": []}
    for r in range(args.rounds):
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in ["mm", *steps]}
        for _ in range(args.reps):
            pairs = [time_once(fn) for _, fn, _ in suite]
            times["mm"].append((sum(w for w, _ in pairs), sum(c for _, c in pairs)))
            for k, fn in steps.items():
                times[k].append(time_once(fn))
        for which, i in (("wall", 0), ("cpu", 1)):
            med = {k: statistics.median(t[i] for t in v) * 1e3 for k, v in times.items()}
            row = dict(med)
            row["mm_gflops"] = step_flops / med["mm"] / 1e6
            if "base" in med:
                row["a"] = med["mm"] / med["base"]
                row["b"] = med["jm"] / med["base"]
            if "jm_refy" in med:
                row["b_refy"] = med["jm_refy"] / med["base_refy"]
            if "plain_base" in med:
                row["a_plain"] = med["mm"] / med["plain_base"]
                row["b_plain"] = med["plain_jm"] / med["plain_base"]
            if "tk_base" in med:
                row["b_tk"] = med["tk_jm"] / med["tk_base"]
            if "tk_jm_refy" in med:
                row["b_tk_refy"] = med["tk_jm_refy"] / med["tk_base_refy"]
            if "tk_jm_dense" in med:
                row["b_tk_dns"] = med["tk_jm_dense"] / med["tk_base"]
            rows[which].append(row)
            if r == 0 and which == "wall":
                print(f"{'round':>9} {'mm GFLOP/s':>10} " + " ".join(f"{k + ' ms':>13}" for k in times)
                      + "  " + " ".join(f"{k:>7}" for k in row if k not in med and k != "mm_gflops"))
            print(f"{r + 1:>3} {which:>5} {row['mm_gflops']:>10.0f} "
                  + " ".join(f"{med[k]:>13.0f}" for k in times) + "  "
                  + " ".join(f"{row[k]:>7.2f}" for k in row if k not in med and k != "mm_gflops"),
                  flush=True)

    def summary(key: str, which: str = "wall") -> str:
        vals = [row[key] for row in rows[which]]
        return f"{statistics.median(vals):.2f} (range {min(vals):.2f}-{max(vals):.2f})"

    def both(key: str) -> str:
        return f"{summary(key)}; by CPU time {summary(key, 'cpu')}"

    print("summary over rounds (medians of wall-clock times; the CPU-time ratios, process CPU seconds "
          "of all threads, are less sensitive to other processes on the machine):")
    if "a" in rows["wall"][0]:
        print(f"(a) step matmul FLOP/s / torch.mm FLOP/s = {both('a')}   target >= 0.6")
        print(f"(b) step time with / without Jacobian matching (target given) = {both('b')}   "
              f"target <= 2.2")
    if "b_refy" in rows["wall"][0]:
        print(f"    (b) when the target is the reference's output (its forward / the jvp primal) = "
              f"{both('b_refy')}")
    if "a_plain" in rows["wall"][0]:
        print(f"    plain autograd coder (coder.fused = False): (a) {both('a_plain')}")
        print(f"                                                (b) {both('b_plain')}")
    if "b_tk" in rows["wall"][0]:
        print(f"(b) TopK k = {args.topk} coder, sparse JVP, target given = {both('b_tk')}   "
              f"target <= 2.2")
        if "b_tk_refy" in rows["wall"][0]:
            print(f"    (b) TopK, target = the reference's output = {both('b_tk_refy')}")
        if "b_tk_dns" in rows["wall"][0]:
            print(f"    (b) TopK with the dense JVP (coder.sparse_jvp = False), target given = "
                  f"{both('b_tk_dns')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
