"""``mechfaith circuit``: the circuit of one feature (or logit) on one prompt.

Records the linearised replacement model on the prompt (attention patterns and norm scales frozen,
transcoders at the given layers, their errors as nodes), runs the greedy path search from the root,
merges the paths into a graph and writes into --out: ``paths.txt`` (one path a line),
``graph.json`` (nodes, edges, error nodes, statistics), ``graph.html`` (the viewer) and
``circuit.json`` (root value, error shares, timings). Prints the top paths and the error share.

The root is ``--feature`` (``mlp8tc[355]@37``, or ``8:355`` with ``--position``) or ``--logit``
(a token id, a one-token text, or ``top`` for the model's top prediction at ``--position``;
``--minus`` makes it a logit difference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mechfaith.cli.arg_types import device, nonneg_float, nonneg_int, positive_int
from mechfaith.cli.out_guard import add_overwrite_option, new_output

OWN_NAMES = ("graph.json", "graph.html", "paths.txt", "circuit.json")  # what circuit writes into its --out


def add_coder_args(p: argparse.ArgumentParser) -> None:
    """``--coders`` and ``--model``, as every command on transcoders and a model takes them."""
    p.add_argument("--coders", nargs="+", required=True, metavar="[LAYER=]PATH",
                   help="transcoder folders (mechfaith, SAELens or GPT-2 .pt); LAYER= when the file "
                        "does not say its layer; a set folder (set.json, from lm train --layers) gives "
                        "every layer's transcoder of the set; a cross-layer transcoder (its folder, or an lm "
                        "train --clt run) gives every layer of its block, cross-layer writes included")
    p.add_argument("--model", default=None, help="model (default: the one the coders were trained on)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("circuit", help="paths and graph of one feature or logit on a prompt",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_coder_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text (BOS is prepended)")
    root = p.add_mutually_exclusive_group(required=True)
    root.add_argument("--feature", help="root feature: mlp8tc[355]@37 or LAYER:INDEX (with --position)")
    root.add_argument("--logit", help="root logit: token id, one-token text, or 'top'")
    p.add_argument("--minus", default=None, help="subtract this token's logit (logit difference)")
    p.add_argument("--position", type=int, default=-1, help="token position of the root (negative: from the end)")
    p.add_argument("--depth", type=positive_int, default=3, help="path length")
    p.add_argument("--beam", type=positive_int, default=15, help="paths kept at each depth")
    p.add_argument("--per-node", type=nonneg_int, default=0, help="at most this many children per node and depth (0: any)")
    p.add_argument("--min-abs", type=nonneg_float, default=0.0, help="ignore children with smaller |attribution|")
    p.add_argument("--device", type=device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    p.add_argument("--out", default="circuit", help="output folder")
    add_overwrite_option(p)
    p.add_argument("--show", type=nonneg_int, default=15, help="paths printed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mechfaith.circuits.search import SearchConfig

    cfg = SearchConfig(depth=args.depth, beam=args.beam, per_node=args.per_node, min_abs=args.min_abs)
    out = Path(args.out)
    with new_output(out, OWN_NAMES, "circuit", overwrite=args.overwrite) as tmp:
        return _circuit(args, cfg, tmp, out)


def _circuit(args: argparse.Namespace, cfg: Any, tmp: Path, out: Path) -> int:
    """Record, search and write into ``tmp`` (which becomes ``out``)."""
    from mechfaith.atomic import write_text_atomic
    from mechfaith.circuits.attribution import Attributor
    from mechfaith.circuits.graph import build_graph, write_graph
    from mechfaith.circuits.replacement import record_run
    from mechfaith.circuits.roots import feature_root, logit_root
    from mechfaith.circuits.search import search_paths
    from mechfaith.circuits.session import meta_of, open_session
    from mechfaith.coders.files import write_json
    from mechfaith.reports.graph_viewer import write_graph_html

    t0 = time.perf_counter()
    session = open_session(args.model, args.coders, args.device)
    ids = session.tokenize(args.prompt)
    seq = int(ids.shape[0])
    strings = [session.token_str(int(t)) for t in ids]
    t1 = time.perf_counter()
    run_ = record_run(session.lm.model, ids, session.transcoders, token_strings=strings)
    at = Attributor(run_)
    if args.feature:
        root = feature_root(args.feature, args.position, seq)
    else:
        root = logit_root(args.logit, args.position, run_.logits, session.token_id, args.minus)
    result = search_paths(at, root, cfg)
    t2 = time.perf_counter()
    graph = build_graph(result, n_layers=run_.n_layers, tokens=ids.tolist(), token_strings=strings,
                        meta={**meta_of(session), "prompt": args.prompt})
    write_graph(tmp / "graph.json", graph)
    write_graph_html(graph, tmp / "graph.html", title=f"{root.name} on {args.prompt[:60]!r}")
    write_text_atomic(tmp / "paths.txt", "".join(f"{p}\n" for p in result.paths))
    stats = graph["stats"]
    summary = {"root": root.name, "root_value": result.root_value, "n_tokens": seq,
               "transcoder_error_norms": run_.error_norms(), "stats": stats,
               "seconds": {"load": t1 - t0, "record_and_search": t2 - t1}, **meta_of(session)}
    write_json(tmp / "circuit.json", summary)
    print(f"root {root.name} ({strings[root.pos]!r}) = {result.root_value:.4g}")
    for p in result.paths[: args.show]:
        print(f"  {p}")
    print(f"graph: {int(stats['n_nodes'])} nodes, {len(graph['edges'])} edges; error share "
          f"{stats['graph_error_share']:.3f} (root {stats.get('root_error_share', float('nan')):.3f}), "
          f"bias {stats['bias_share']:.3f}, pruned {stats['pruned_share']:.3f}")
    print(f"wrote {out / 'graph.json'}, {out / 'graph.html'}, {out / 'paths.txt'}, {out / 'circuit.json'}")
    sys.stdout.flush()
    return 0
