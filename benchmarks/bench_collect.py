#!/usr/bin/env python
"""Activation-collection throughput as a fraction of a bare forward pass stopped at the same layer.

Run: ``python benchmarks/bench_collect.py`` (options: ``--help``). Loads a model (default the
offline SmolLM2-135M; ``--model gpt2-random`` or ``random-llama`` need no model files beyond the
tokenizer), packs ``--contexts`` Shakespeare contexts, and times on exactly these inputs, in one
process, interleaved within each repetition (the CPU may be shared):

- ``bare``: the model's forward pass stopped right after layer L's MLP output (one hook that raises
  ``StopForward``; nothing is stored). This is the floor any collector has to pay.
- ``collect``: :func:`mechfaith.lm.activations.iter_model_activations` (hooks on the MLP input and
  output, BOS dropped, rows copied out), i.e. what the trainer's streams consume.
- ``collect+disk``: :func:`mechfaith.lm.activation_cache.write_activation_cache` to a temporary folder:
  the above plus the shuffle buffer and safetensors shards with SHA-256 (the ``lm collect`` path).

Throughput is tokens per second over all positions of the contexts (BOS included, the same count
for every kind); the ratio is median(bare time) / median(kind time), by wall clock and by process
CPU time (less sensitive to other processes on a shared machine). Target: >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mechfaith.lm.activation_cache import write_activation_cache
from mechfaith.lm.activations import ActivationConfig, iter_model_activations
from mechfaith.lm.adapters import StopForward, hooks_removed_after
from mechfaith.lm.config import LMConfig
from mechfaith.lm.corpus import CorpusConfig, get_corpus
from mechfaith.lm.model_cache import get_model, resolve_layer


def bare_forward(adapter, contexts: torch.Tensor, layer: int, batch_contexts: int) -> None:
    """Forward passes stopped after ``layer``'s MLP output, nothing captured."""

    def stop(_t: torch.Tensor) -> None:
        raise StopForward

    device = next(adapter.model.parameters()).device
    with torch.inference_mode(), hooks_removed_after() as handles:
        handles.extend(adapter.hook_site(layer, "mlp_out", stop))
        for i in range(0, contexts.shape[0], batch_contexts):
            try:
                adapter.forward(contexts[i:i + batch_contexts].to(device))
            except StopForward:
                pass


def collect_iter(adapter, contexts: torch.Tensor, layer: int, batch_contexts: int) -> None:
    for _ in iter_model_activations(adapter, contexts, [layer], "mlp_in", "mlp_out", batch_contexts,
                                    exclude_bos=True):
        pass


def collect_disk(adapter, contexts: torch.Tensor, layer: int, batch_contexts: int, folder: Path) -> None:
    cfg = ActivationConfig(layers=[layer], batch_contexts=batch_contexts, buffer_tokens=65536)
    write_activation_cache(adapter, contexts, cfg, folder, progress=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name (built-in, folder or hub name)")
    ap.add_argument("--layer", type=int, default=-1, help="layer (-1: the middle layer)")
    ap.add_argument("--contexts", type=int, default=32, help="contexts per measurement")
    ap.add_argument("--context-length", type=int, default=128, help="tokens per context")
    ap.add_argument("--batch-contexts", type=int, default=16, help="contexts per forward pass")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model's device)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = get_model(LMConfig(model=args.model, device=args.device))
    adapter = lm.adapter
    layer = resolve_layer(adapter, args.layer)
    corpus = get_corpus(lm, CorpusConfig(context_length=args.context_length))
    contexts = corpus.train[: args.contexts]
    cuda = args.device.startswith("cuda")
    n_tok = contexts.numel()
    print(f"mechfaith activation-collection benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", device {args.device} ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"model {lm.name} ({adapter.family.name}, {adapter.n_layers} layers), layer {layer}; "
          f"{contexts.shape[0]} contexts x {contexts.shape[1]} tokens = {n_tok} tokens per measurement, "
          f"{args.batch_contexts} contexts per forward pass")

    # warm-up (allocator, kernels)
    bare_forward(adapter, contexts[: args.batch_contexts], layer, args.batch_contexts)
    collect_iter(adapter, contexts[: args.batch_contexts], layer, args.batch_contexts)
    kinds = ("bare", "collect", "collect+disk")
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="mf_bench_collect_") as tmp:
        for rep in range(args.reps):
            for kind in kinds:
                t0, c0 = time.perf_counter(), time.process_time()
                if kind == "bare":
                    bare_forward(adapter, contexts, layer, args.batch_contexts)
                elif kind == "collect":
                    collect_iter(adapter, contexts, layer, args.batch_contexts)
                else:
                    collect_disk(adapter, contexts, layer, args.batch_contexts, Path(tmp) / f"cache{rep}")
                if cuda:
                    torch.cuda.synchronize()
                wall[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
    for name, times in (("wall-clock", wall), ("process CPU time", cpu)):
        bare = statistics.median(times["bare"])
        print(f"{name}: {'kind':14s} {'median s':>9s} {'tok/s':>9s} {'ratio':>6s}   (all repetitions, s)")
        for kind, ts in times.items():
            med = statistics.median(ts)
            print(f"{'':{len(name) + 2}s}{kind:14s} {med:9.2f} {n_tok / med:9.0f} {bare / med:6.3f}   "
                  f"({', '.join(f'{t:.2f}' for t in ts)})")
    ratio = statistics.median(wall["bare"]) / statistics.median(wall["collect+disk"])
    ratio_cpu = statistics.median(cpu["bare"]) / statistics.median(cpu["collect+disk"])
    print(f"collection throughput / bare forward to layer {layer}: {ratio:.3f} wall-clock, "
          f"{ratio_cpu:.3f} CPU time (target >= 0.9: {'met' if min(ratio, ratio_cpu) >= 0.9 else 'NOT met'})")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
