#!/usr/bin/env python
"""Attribution graphs on SmolLM2-135M with a transcoder at every layer: time and peak memory by prompt length.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_graph.py --coders runs/set            # 64..512 tokens
    PYTHONPATH=src .venv/bin/python benchmarks/bench_graph.py --coders runs/set --lengths 64 128

Each length runs in a fresh process (so its peak resident memory is its own): load the model and the
set, take the first held-out Shakespeare context of that many tokens, record the replacement run and
build the graph (``build_attribution_graph`` at ``--max-feature-nodes``, pruning and both scores
included). Reported per length: active features, seconds to record and to build, peak RSS of the
process and its growth over the RSS after loading (the graph's own memory), and what a dense square
node-by-node adjacency (circuit-tracer's ``Graph.adjacency_matrix``: (features + errors + tokens +
logits)^2 float32 over the kept features) would take. The summary fits the growth exponents
``time ~ n^a`` and ``memory ~ n^b`` by least squares on log-log.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time


def one(args: argparse.Namespace) -> dict:
    import torch

    from mechfaith.circuits.attribution_graph import GraphConfig, build_attribution_graph
    from mechfaith.circuits.replacement import record_run
    from mechfaith.circuits.session import open_session
    from mechfaith.lm.corpus import CorpusConfig, eval_contexts

    torch.set_num_threads(args.threads)
    session = open_session(None, [args.coders], args.device)
    ctx, _ = eval_contexts(session.lm, CorpusConfig(source="shakespeare", context_length=args.one), 1)
    ids = ctx[0]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = record_run(session.lm.model, ids, session.transcoders)
    t1 = time.perf_counter()
    graph = build_attribution_graph(run, GraphConfig(max_feature_nodes=args.max_feature_nodes))
    scores = graph.scores()
    graph.prune()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    b = graph.blocks
    return {"n_tokens": int(ids.shape[0]), "active_features": graph.n_active, "feature_nodes": b.n_features,
            "seconds_record": t1 - t0, "seconds_graph": t2 - t1, "peak_rss_gb": peak, "rss_after_load_gb": base,
            "graph_gb": peak - base, "dense_square_gb": b.n_nodes ** 2 * 4 / 1e9,
            "cuda_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if args.device != "cpu" else None,
            "replacement_score": scores.replacement_score, "completeness_score": scores.completeness_score}


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / max(sum((a - mx) ** 2 for a in lx), 1e-12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coders", required=True, help="a set folder of SmolLM2-135M (lm train --layers all)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--max-feature-nodes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args)))
        return 0
    rows = []
    for n in args.lengths:
        cmd = [sys.executable, __file__, "--coders", args.coders, "--one", str(n), "--threads", str(args.threads),
               "--max-feature-nodes", str(args.max_feature_nodes), "--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['n_tokens']:4d} tokens: {row['active_features']:7d} active, record {row['seconds_record']:.1f} s, "
              f"graph {row['seconds_graph']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB (graph {row['graph_gb']:.2f} GB; "
              f"a dense square adjacency: {row['dense_square_gb']:.2f} GB), replacement {row['replacement_score']:.3f}, "
              f"completeness {row['completeness_score']:.3f}", flush=True)
    ns = [r["n_tokens"] for r in rows]
    summary = {"rows": rows, "max_feature_nodes": args.max_feature_nodes, "threads": args.threads,
               "time_exponent": slope(ns, [r["seconds_graph"] for r in rows]) if len(rows) > 1 else None,
               "memory_exponent": slope(ns, [r["graph_gb"] for r in rows]) if len(rows) > 1 else None}
    if len(rows) > 1:
        print(f"growth: time ~ n^{summary['time_exponent']:.2f}, graph memory ~ n^{summary['memory_exponent']:.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
