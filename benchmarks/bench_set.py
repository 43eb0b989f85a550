#!/usr/bin/env python
"""A transcoder at every layer of SmolLM2-135M: tokens per second through the forward pass and all coders.

Run (sparsify lives in the peers' venv, built by ``bash benchmarks/setup_peers.sh``; mechfaith is
imported from ``src/``, so all contenders run in one process, interleaved):

    PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/bench_set.py --threads 1   # ~7 min on 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/bench_set.py                         # without sparsify
    PYTHONPATH=src /tmp/peers-venv/bin/python benchmarks/bench_set.py --help

Same work for everyone: SmolLM2-135M (float32), one batch of ``--contexts`` x ``--ctx-len`` random
tokens (BOS first; default 8 x 128 = 1024 tokens, every position trained on: BOS is not left out,
as sparsify keeps it), one TopK transcoder ``mlp_in -> mlp_out`` per layer of ``--layers``
(default all 30; d 576 -> ``--latents`` 4608, k ``--k`` 32, linear skip on both sides: mechfaith's
LM default, sparsify's ``skip_connection=True``). Contenders, each timed per training step of all
the layers' coders (tokens per second = batch tokens / step time):

- ``set``: mechfaith's set with dense coders (one ``Trainer`` per layer,
  ``SparseCoder`` from ``LMCoderConfig.coder_config`` initialised by ``init_from_data`` on the
  batch, the LM training defaults): one forward pass
  capturing every layer (``iter_model_activations``; it stops after the last layer's MLP, so no
  final norm and no logits) and one ``run_step`` of all the Trainers together (one host sync).
- ``set_sparse``: the same Trainers with their coders switched to the sparse TopK training path
  (``enable_sparse_decode``: CSR decoder, sparse encoder backward), which is what ``lm train
  --layers all`` runs (``LMCoderConfig.sparse_decode``, on by default since 2026-11-30); sparsify's
  CPU path is sparse too, so this is the like-for-like row against it.
- ``sequential`` (a): today's single-layer path, one layer after another: per layer a forward pass
  stopped at that layer (``iter_model_activations`` with ``[l]``) and one ``Trainer.step`` of that
  layer's coder (the same dense coders as ``set``). Today's ``lm train`` also writes the
  activations to an on-disk cache (shuffle buffer, safetensors shards with SHA-256) and reads them
  back; that is not included unless ``--disk`` (then ``sequential_disk`` does it per layer).
  bench_collect.py measured the write at 0.95-1.0x of the bare forward's speed, so the sequential
  figures without it are an upper bound on today's speed.
- ``sparsify`` (b): EleutherAI sparsify's own ``Trainer.fit`` (multi-hookpoint, ``transcode=True``,
  hookpoints ``layers.<l>.mlp``, ``num_latents``, ``k``, ``batch_size`` = contexts, ``loss_fn="fvu"``,
  its default optimizer ``signum``; ``--sparsify-adam`` also times its ``adam``). One step of its
  loop: the model's full forward pass (to the logits) with a hook on every hookpoint in which each
  coder runs forward, FVU loss and its own backward; then the optimizer step, zero_grad and the
  dead-latent counters. Timed from the dataloader's fetch of one batch to the next (to the end of
  the loop for the last), one step per ``fit`` call so it can be interleaved with the others; its
  checkpoint writing at the end of ``fit`` is skipped (``save`` replaced by a time stamp). On CPU
  it runs its eager path ("Triton not installed": ``embedding_bag`` decoder, ``index_add``
  encoder backward). On CUDA sparsify runs its coders under bf16 autocast and sets
  ``float32_matmul_precision("high")`` (TF32) during ``fit`` (restored after each call here);
  mechfaith's contenders stay float32 (``--tf32`` gives them TF32 too).

Dead latents: both sides count tokens since a latent fired, but neither's AuxK loss runs here
(sparsify's ``auxk_alpha`` defaults to 0; mechfaith's ``dead_window`` is set to sparsify's 10M
tokens, so no latent is dead within the benchmark). Optimisers differ by design: mechfaith fused
Adam (plus unit-norm decoder rows: parallel gradient removed, rows renormalised), sparsify
signum / unfused Adam (no decoder renormalisation for transcoders).

Every repetition runs each contender once, back to back, so load from other processes hits all of
them alike; per round, each contender's fastest repetition (the least disturbed) gives the round's
ratios; the summary is the median over rounds, with the ratios of the median times alongside.
On a small CPU shared with other processes use ``--threads 1``: with torch's default threads the
coder steps become erratic and up to 3x slower (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.init import init_from_data
from mechfaith.coders.sparse_decode import SparseDecodeCoder
from mechfaith.lm.activations import iter_model_activations
from mechfaith.lm.config import LMCoderConfig, LMConfig, lm_train_config
from mechfaith.lm.layer_set import parse_layers
from mechfaith.lm.model_cache import get_model
from mechfaith.perf import tune_malloc
from mechfaith.training.engine import run_step
from mechfaith.training.trainer import Trainer

Timed = Callable[[], tuple[float, float]]  # one step; returns (wall s, process CPU s) of the step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stamp(device: str) -> tuple[float, float]:
    sync(device)
    return time.perf_counter(), time.process_time()


# ---------------------------------------------------------------------------------------------- mechfaith
def build_trainers(acts: dict[int, tuple[Any, Any]], n: int, k: int, skip: bool,
                   device: str) -> dict[int, Trainer]:
    """One Trainer per layer of ``acts`` (a batch of every layer's (x, y)), as ``lm train --layers
    all`` builds them (prepare_coder_run): the LM coder and training defaults, initialised from the
    data (least-squares skip, centred and scaled encoder). The initialisation matters for the
    speed of the sparse paths: uncentred, SmolLM2's activations send most tokens to the same few
    latents (1600-2800 distinct latents in a batch's top 32 instead of ~4500)."""
    lmc = LMCoderConfig(n_latents=n, k=k, skip=skip)
    tcfg = lm_train_config(n_steps=10**9, log_every=10**9, checkpoint_every=0, dead_window=10_000_000,
                           device=device)
    out = {}
    for l, (x, y) in acts.items():
        coder = SparseCoder(lmc.coder_config(x.shape[-1], y.shape[-1]), generator=torch.Generator().manual_seed(l))
        init_from_data(coder, x.cpu(), y.cpu(), skip_init=lmc.skip_init, latent_init_fraction=lmc.latent_init_fraction,
                       center_encoder=lmc.center_encoder)
        out[l] = Trainer(coder, tcfg, progress=False, name=f"L{l}")
    return out


@contextlib.contextmanager
def coder_class(trainers: dict[int, Trainer], cls: type) -> Any:
    """Run the trainers' coders as ``cls`` (SparseDecodeCoder: what ``enable_sparse_decode`` does,
    same object and parameters), then switch them back."""
    old = [t.coder.__class__ for t in trainers.values()]
    for t in trainers.values():
        t.coder.__class__ = cls
    try:
        yield
    finally:
        for t, c in zip(trainers.values(), old):
            t.coder.__class__ = c


def activations(lm, contexts: torch.Tensor, layers: list[int], device: str) -> dict[int, tuple[Any, Any]]:
    return next(iter_model_activations(lm.adapter, contexts, layers, batch_contexts=contexts.shape[0],
                                       exclude_bos=False, device=device))


def mf_set(lm, contexts, trainers: dict[int, Trainer], device: str, parts: dict[str, list[float]],
           sparse: bool = False) -> Timed:
    layers = sorted(trainers)
    members = [trainers[l] for l in layers]
    key = "set_sparse" if sparse else "set"

    def step() -> tuple[float, float]:
        with coder_class(trainers, SparseDecodeCoder if sparse else SparseCoder):
            t0, c0 = stamp(device)
            acts = activations(lm, contexts, layers, device)
            t1, _ = stamp(device)
            run_step(members, [acts[l] for l in layers])
            t2, c2 = stamp(device)
        parts.setdefault(key + ":forward", []).append(t1 - t0)
        parts.setdefault(key + ":coders", []).append(t2 - t1)
        return t2 - t0, c2 - c0

    return step


def mf_sequential(lm, contexts, trainers: dict[int, Trainer], device: str, parts: dict[str, list[float]],
                  disk: bool = False) -> Timed:
    """Per layer: a forward pass stopped at that layer (``disk``: written to an activation cache and
    read back, as ``lm collect`` / ``lm train`` do) and one step of that layer's coder."""
    from mechfaith.lm.activation_cache import CachedActivationStream, write_activation_cache
    from mechfaith.lm.activations import ActivationConfig

    key = "sequential_disk" if disk else "sequential"
    rows = contexts.numel()

    def one_layer(l: int, tmp: str) -> tuple[Any, Any]:
        if not disk:
            return activations(lm, contexts, [l], device)[l]
        cfg = ActivationConfig(layers=[l], batch_contexts=contexts.shape[0], batch_size=rows,
                               exclude_bos=False, buffer_tokens=max(rows, 2))
        folder = write_activation_cache(lm.adapter, contexts, cfg, os.path.join(tmp, f"L{l}"), progress=False)
        return CachedActivationStream(folder, l, rows, device=device).next_batch()

    def step() -> tuple[float, float]:
        fwd = coders = 0.0
        with tempfile.TemporaryDirectory(prefix="mf_bench_set_") as tmp:
            t0, c0 = stamp(device)
            for l in sorted(trainers):
                ta, _ = stamp(device)
                x, y = one_layer(l, tmp)
                tb, _ = stamp(device)
                trainers[l].step(x, y)
                tc, _ = stamp(device)
                fwd, coders = fwd + tb - ta, coders + tc - tb
            t1, c1 = stamp(device)
        parts.setdefault(key + ":forward", []).append(fwd)
        parts.setdefault(key + ":coders", []).append(coders)
        return t1 - t0, c1 - c0

    return step


# ---------------------------------------------------------------------------------------------- sparsify
class SparsifyBatches(torch.utils.data.Dataset):
    """sparsify's dataset: rows ``{"input_ids": [ctx_len]}``, ``n_batches`` batches of our contexts per
    ``fit`` call. Stamps the time whenever its dataloader fetches a batch (a step starts), so the
    steps of sparsify's own loop can be timed from outside."""

    def __init__(self, contexts: torch.Tensor, n_batches: int, device: str) -> None:
        self.contexts, self.n_batches, self.device = contexts, n_batches, device
        self.stamps: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return self.contexts.shape[0] * self.n_batches

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.contexts[i % self.contexts.shape[0]]}

    def __getitems__(self, idx: list[int]) -> list[dict[str, torch.Tensor]]:
        self.stamps.append(stamp(self.device))
        return [self[i] for i in idx]

    def select(self, _rows: Any) -> SparsifyBatches:
        return self  # fit() skips the rows of steps already done; every call here brings new ones


def sparsify_fit(lm, contexts, layers: list[int], n: int, k: int, skip: bool, optimizer: str,
                 device: str, save_dir: str) -> Timed:
    """One step of sparsify's own ``Trainer.fit`` per call (see the module docs)."""
    from sparsify import SparseCoderConfig
    from sparsify import Trainer as SpTrainer
    from sparsify.config import TrainConfig as SpTrainConfig

    data = SparsifyBatches(contexts.cpu(), 1, device)
    cfg = SpTrainConfig(SparseCoderConfig(num_latents=n, k=k, skip_connection=skip, transcode=True),
                        batch_size=contexts.shape[0], loss_fn="fvu", optimizer=optimizer,  # type: ignore[arg-type]
                        hookpoints=[f"layers.{l}.mlp" for l in layers], log_to_wandb=False, save_dir=save_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = SpTrainer(cfg, data, lm.model)  # type: ignore[arg-type]
    assert len(trainer.saes) == len(layers), trainer.cfg.hookpoints
    ends: list[tuple[float, float]] = []
    trainer.save = lambda: ends.append(stamp(device))  # type: ignore[method-assign]  # no checkpoint files

    def step() -> tuple[float, float]:
        data.stamps.clear()
        ends.clear()
        precision = torch.get_float32_matmul_precision()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                trainer.fit()
        finally:
            torch.set_float32_matmul_precision(precision)
        (t0, c0), (t1, c1) = data.stamps[0], ends[0]
        return t1 - t0, c1 - c0

    return step


# ---------------------------------------------------------------------------------------------- timing
def measure(contenders: dict[str, Timed], rounds: int, reps: int, warmup: int, tokens: int,
            parts: dict[str, list[float]]) -> list[dict[str, float]]:
    """Per round and contender: ``name`` (median wall s), ``name:min`` (fastest wall s), ``name:cpu``
    (median process CPU s). The sequential contenders need no warm-up step of their own: they
    step the set's Trainers (warmed up by ``set``) on the same model."""
    t0 = time.perf_counter()
    for name, fn in contenders.items():
        for _ in range(0 if name.startswith("sequential") else warmup):
            fn()
    print(f"  warm-up done in {time.perf_counter() - t0:.0f} s", flush=True)
    parts.clear()
    out = []
    for r in range(rounds):
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
        for _ in range(reps):
            for name, fn in contenders.items():
                times[name].append(fn())
        row: dict[str, float] = {}
        for name, v in times.items():
            row[name] = statistics.median(w for w, _ in v)
            row[name + ":min"] = min(w for w, _ in v)
            row[name + ":cpu"] = statistics.median(c for _, c in v)
        out.append(row)
        print(f"  round {r + 1}, tokens/s (fastest repetition, its s/step): "
              + "  ".join(f"{k} {tokens / row[k + ':min']:.0f} ({row[k + ':min']:.2f} s)" for k in contenders)
              + f"   [load {os.getloadavg()[0]:.1f}]", flush=True)
    return out


def ratios(rows: list[dict[str, float]], num: str, den: str, suffix: str = ":min") -> list[float]:
    """Throughput of ``num`` over throughput of ``den`` (= time(den) / time(num)) per round."""
    return [row[den + suffix] / row[num + suffix] for row in rows]


def describe(rows: list[dict[str, float]], num: str, den: str) -> str:
    best = ratios(rows, num, den)
    return (f"{statistics.median(best):.2f} (rounds: {', '.join(f'{v:.2f}' for v in best)}); "
            f"by median wall {statistics.median(ratios(rows, num, den, '')):.2f}, "
            f"by CPU time {statistics.median(ratios(rows, num, den, ':cpu')):.2f}")


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="all", help="all, a range a-b or a list (default all)")
    p.add_argument("--latents", type=int, default=4608, help="latents per coder (576 x 8)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--contexts", type=int, default=8, help="contexts per batch")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per context (BOS first)")
    p.add_argument("--no-skip", action="store_true", help="coders without the linear skip (both sides)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=1, help="repetitions per round")
    p.add_argument("--warmup", type=int, default=1, help="steps of each contender before timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--disk", action="store_true", help="also time (a) with the on-disk activation cache")
    p.add_argument("--no-sparse", action="store_true", help="skip the set_sparse contender")
    p.add_argument("--no-sparsify", action="store_true", help="skip sparsify even where it is installed")
    p.add_argument("--sparsify-adam", action="store_true", help="also time sparsify with optimizer='adam'")
    p.add_argument("--tf32", action="store_true", help="CUDA: TF32 matmuls for mechfaith too")
    args = p.parse_args(argv)
    tuned = tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    lm = get_model(LMConfig(model=args.model, device=dev))
    layers = parse_layers(args.layers, lm.adapter.n_layers)
    d = lm.model.config.hidden_size  # the MLP's input and output width (576)
    g = torch.Generator().manual_seed(0)
    vocab = lm.model.config.vocab_size
    contexts = torch.randint(2, vocab, (args.contexts, args.ctx_len), generator=g)
    contexts[:, 0] = lm.bos_token_id if lm.bos_token_id is not None else 0
    tokens = contexts.numel()
    skip = not args.no_skip
    try:
        import sparsify
        sp_version = getattr(sparsify, "__version__", None)
        if sp_version is None:
            from importlib.metadata import version
            sp_version = version("eai-sparsify")
    except ImportError:
        sp_version = None
    load0 = os.getloadavg()
    print(f"# bench_set  {datetime.datetime.now():%Y-%m-%d %H:%M}  {machine(dev)}  malloc tuned {tuned}  "
          f"load avg {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}")
    print(f"# {lm.name}: {len(layers)} of {lm.adapter.n_layers} layers; TopK transcoders mlp_in -> mlp_out "
          f"{d} -> {args.latents} (k {args.k}, skip {skip}), float32 on {dev}; batch {args.contexts} x "
          f"{args.ctx_len} = {tokens} tokens; {args.rounds} rounds x {args.reps} interleaved repetitions "
          f"after {args.warmup} warm-up; sparsify: " + (sp_version or "not installed in this Python "
                                                          "(run benchmarks/setup_peers.sh and use its venv)"))
    trainers = build_trainers(activations(lm, contexts, layers, dev), args.latents, args.k, skip, dev)
    parts: dict[str, list[float]] = {}
    c: dict[str, Timed] = {"set": mf_set(lm, contexts, trainers, dev, parts)}
    if not args.no_sparse:
        c["set_sparse"] = mf_set(lm, contexts, trainers, dev, parts, sparse=True)
    c["sequential"] = mf_sequential(lm, contexts, trainers, dev, parts)
    if args.disk:
        c["sequential_disk"] = mf_sequential(lm, contexts, trainers, dev, parts, disk=True)
    with tempfile.TemporaryDirectory(prefix="sparsify_bench_set_") as save_dir:
        if sp_version and not args.no_sparsify:
            c["sparsify"] = sparsify_fit(lm, contexts, layers, args.latents, args.k, skip, "signum", dev, save_dir)
            if args.sparsify_adam:
                c["sparsify_adam"] = sparsify_fit(lm, contexts, layers, args.latents, args.k, skip, "adam", dev,
                                                  save_dir)
        rows = measure(c, args.rounds, args.reps, args.warmup, tokens, parts)
    load1 = os.getloadavg()
    print(f"summary: tokens/s of the fastest repetition, median over rounds (load avg now {load1[0]:.1f} "
          f"{load1[1]:.1f} {load1[2]:.1f}):")
    for name in c:
        split = ""
        if name + ":forward" in parts:
            fwd, cod = statistics.median(parts[name + ":forward"]), statistics.median(parts[name + ":coders"])
            split = f"   (median step: forward {fwd:.2f} s + coders {cod:.2f} s)"
        print(f"  {name:16s} {statistics.median(tokens / r[name + ':min'] for r in rows):8.0f} tok/s  "
              f"{statistics.median(r[name + ':min'] for r in rows):7.2f} s/step{split}")
    print("ratios (throughput / throughput; per round from the fastest repetitions):")
    print(f"  set / sequential (a)        = {describe(rows, 'set', 'sequential')}   target >= 3")
    if "set_sparse" in c:
        print(f"  set_sparse / sequential (a) = {describe(rows, 'set_sparse', 'sequential')}")
    if "sequential_disk" in c:
        print(f"  set / sequential_disk (a)   = {describe(rows, 'set', 'sequential_disk')}")
    if "sparsify" in c:
        print(f"  set / sparsify (b)          = {describe(rows, 'set', 'sparsify')}   target >= 1.0 (aim 1.5)")
        if "set_sparse" in c:
            print(f"  set_sparse / sparsify (b)   = {describe(rows, 'set_sparse', 'sparsify')}   "
                  f"target >= 1.0 (aim 1.5)")
        if "sparsify_adam" in c:
            best = "set_sparse" if "set_sparse" in c else "set"
            print(f"  {best} / sparsify adam   = {describe(rows, best, 'sparsify_adam')}")
    else:
        print("  (b) sparsify: not run (" + ("--no-sparsify" if sp_version else "not installed here") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
