#!/usr/bin/env python
"""Time and peak memory of a circuit search on a GPT-2-small-shaped random model.

Run: ``python benchmarks/bench_circuits.py`` (options: ``--help``). Builds a random GPT-2 small
(12 layers, d_model 768, 12 heads) with a random TopK transcoder of 24576 features spliced in at
every layer, a 128-token random prompt, then times (a) recording the replacement model on the prompt
(one model pass + 12 transcoder encodes) and (b) the greedy path search from an active last-layer
feature at the last token (depth 3, beam 15) plus merging into a graph. Prints the times, the peak
resident memory of the process (ru_maxrss), the memory of the weights alone, and the largest tensor
the attribution materialises per expansion batch (never a heads x positions x positions x d_model
tensor: the heads' children are computed from the parent's vector pulled back through W_O).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from mechfaith.circuits.attribution import Attributor
from mechfaith.circuits.graph import build_graph, check_completeness
from mechfaith.circuits.nodes import Node
from mechfaith.circuits.replacement import Transcoder, record_run
from mechfaith.circuits.search import SearchConfig, search_paths
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--features", type=int, default=24576)
    ap.add_argument("--k", type=int, default=64, help="TopK active features per token")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--beam", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model, transcoders and attribution)")
    args = ap.parse_args()
    dev = args.device
    cuda = dev.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=12)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    tcs = []
    for l in range(args.layers):
        c = SparseCoder(CoderConfig(d_in=args.d_model, n_latents=args.features, activation="topk",
                                    k=args.k), generator=g).eval().to(dev)
        for p in c.parameters():
            p.requires_grad_(False)
        tcs.append(Transcoder(l, c))
    build_s = time.perf_counter() - t0
    weights_mb = (sum(p.numel() for p in model.parameters()) +
                  sum(p.numel() for t in tcs for p in t.coder.parameters())) * 4 / 2**20
    rss_before = peak_rss_mb()
    ids = torch.randint(0, cfg.vocab_size, (args.seq,), generator=g)

    t1 = time.perf_counter()
    run = record_run(model, ids, tcs)
    sync()
    record_s = time.perf_counter() - t1
    at = Attributor(run)
    f = run.transcoders[args.layers - 1].f[args.seq - 1]
    root = Node("feature", args.seq - 1, args.layers - 1, int(f.argmax()))
    t2 = time.perf_counter()
    result = search_paths(at, root, SearchConfig(depth=args.depth, beam=args.beam))
    graph = build_graph(result, n_layers=args.layers, tokens=ids.tolist())
    sync()
    search_s = time.perf_counter() - t2
    total_s = record_s + search_s
    per_row = args.layers * cfg.n_head * args.seq + args.layers * args.features + 3 * args.layers + 2
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
          + (f", device {dev} ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"model: GPT-2 shape, {args.layers} layers, d_model {args.d_model}, 12 heads; "
          f"transcoders: {args.features} features/layer (TopK k={args.k}) at every layer; prompt {args.seq} tokens")
    print(f"search: root {root.name}, depth {args.depth}, beam {args.beam}: {len(result.paths)} paths, "
          f"{int(graph['stats']['n_nodes'])} nodes, {len(result.occurrences) - 1} edges; "
          f"completeness violations: {len(check_completeness(graph))}")
    print(f"build model + transcoders: {build_s:.1f} s (not counted)")
    print(f"record replacement model: {record_s:.2f} s")
    print(f"path search + graph:      {search_s:.2f} s")
    print(f"TOTAL (record + search):  {total_s:.2f} s  (target < 60 s)")
    print(f"weights: {weights_mb:.0f} MiB; peak RSS before the run {rss_before:.0f} MiB, "
          f"after {peak_rss_mb():.0f} MiB (+{peak_rss_mb() - rss_before:.0f} MiB)"
          + (f"; GPU peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if cuda else ""))
    print(f"largest attribution tensor per expansion batch: [probes <= {args.beam}, {per_row}] "
          f"({args.beam * per_row * 4 / 2**20:.1f} MiB float32)")
    print("top paths:")
    for p in result.paths[:5]:
        print("  ", p)


if __name__ == "__main__":
    main()
