"""``mechfaith graph``: the attribution graph of a prompt's next-token logits.

Records the prompt's linearised replacement model (attention patterns and norm scales frozen, a
transcoder at every layer of --coders, errors as nodes), computes the direct effects among the
most influential active features, the error nodes, the tokens and the top logits, prunes the
graph by influence and writes into --out (replaced whole if it holds an earlier graph):

- ``graph.json``: mechfaith's format, with ``replacement_score`` and ``completeness_score`` at its
  top level, the pruned nodes and links, the intervention check and timings;
- ``neuronpedia.json``: the same graph in the schema circuit-tracer's frontend and Neuronpedia load;
- ``graph.html``: the viewer (tokens along the bottom, layers upward; a click on a feature opens its
  dashboard in ``dashboards/``, written for the --dashboards most influential features).

The check ablates the --check most influential features one at a time and compares the graph's
predicted change of the target logit with the measured one (rank correlation and median relative
error) in three worlds: frozen (attention, norms and the active features frozen: the graph's own
world), frozen_nonlinear (features recomputed by their activation) and live (the real model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mechfaith.cli.arg_types import device, nonneg_int, positive_int
from mechfaith.cli.circuit import add_coder_args
from mechfaith.cli.dataclass_args import add_dataclass_args, add_quiet_option
from mechfaith.cli.out_guard import add_overwrite_option

GRAPH_FILES = ("graph.json", "neuronpedia.json", "graph.html", "dashboards")
CASE_STUDY = {  # name -> prompt (the README's case study)
    "factual": "The Eiffel Tower is located in the city of",
    "shakespeare": "Friends, Romans, countrymen, lend me your",
    "induction": "Mr. Dursley was the director of a firm called Grunnings, which made drills. Mr. Dursley "
                 "was the director of a firm called",
}


def add_parser(subparsers: Any) -> None:
    from mechfaith.circuits.attribution_graph import GraphConfig

    p = subparsers.add_parser("graph", help="attribution graph of a prompt (features, errors, tokens, logits)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_coder_args(p)
    p.add_argument("--prompt", default=None, help="the prompt text (BOS is prepended)")
    p.add_argument("--case-study", action="store_true",
                   help="instead of --prompt: the built-in prompts (factual, Shakespeare, induction), one "
                        "folder each in --out, with case_study.md and case_study.json summarising them")
    p.add_argument("--position", type=int, default=-1, help="position of the target logits (negative: from the end)")
    p.add_argument("--target", nargs="+", default=None, metavar="TOKEN",
                   help="target these tokens (ids or one-token texts) instead of the top predictions")
    p.add_argument("--minus", default=None, help="with one --target: the logit difference target - minus")
    add_dataclass_args(p, GraphConfig)
    p.add_argument("--check", type=nonneg_int, default=20, help="features ablated in the intervention check (0: none)")
    p.add_argument("--dashboards", default="all", metavar="all|N",
                   help="dashboards of every feature of the pruned graph (all), of its N most influential, or none (0)")
    p.add_argument("--dashboard-contexts", type=positive_int, default=32, help="held-out contexts the dashboards scan")
    p.add_argument("--corpus-source", default="shakespeare", help="corpus of the dashboards' contexts")
    p.add_argument("--device", type=device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    p.add_argument("--out", default="graph", help="output folder")
    add_overwrite_option(p)
    add_quiet_option(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from mechfaith.atomic import check_replaceable
    from mechfaith.errors import ConfigError

    if args.dashboards != "all" and not (args.dashboards.isdigit()):
        raise ConfigError(f"--dashboards takes 'all' or a count >= 0, not {args.dashboards!r}")
    if args.minus is not None and (not args.target or len(args.target) != 1):
        raise ConfigError("--minus needs exactly one --target")
    check_replaceable(args.out, (*CASE_STUDY, "case_study.md", "case_study.json") if args.case_study
                      else GRAPH_FILES, "graph", overwrite=args.overwrite)


def _bar(args: argparse.Namespace, desc: str) -> Any:
    from tqdm import tqdm

    if getattr(args, "quiet", False):
        return None
    bar = tqdm(desc=desc, unit="row", file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
    return update


def _dashboards(args: argparse.Namespace, session: Any, graph: Any, pruned: Any, folder: Path) -> dict[str, str]:
    """Dashboards of the most influential kept features; node id -> relative link."""
    import torch

    from mechfaith.circuits.dashboard_data import feature_dashboards
    from mechfaith.lm.corpus import CorpusConfig, eval_contexts
    from mechfaith.reports.dashboard import page_name, write_dashboards

    F = graph.blocks.n_features
    n = F if args.dashboards == "all" else int(args.dashboards)
    if n == 0 or F == 0:
        return {}
    infl = graph.influence()[:F] * pruned.node_mask[:F]
    top = [int(j) for j in torch.argsort(infl, descending=True)[:n] if infl[j] > 0]
    feats = sorted({(int(graph.features[j, 0]), int(graph.features[j, 2])) for j in top})
    if not feats:  # no kept feature of positive influence
        return {}
    contexts, where = eval_contexts(session.lm, CorpusConfig(source=args.corpus_source), args.dashboard_contexts)
    ds = feature_dashboards(session.lm.model, session.transcoders, contexts, feats, session.token_str)
    write_dashboards(ds, folder / "dashboards", title=f"Features of {session.lm.name} ({where})")
    pages = {(d["layer"], d["index"]): page_name(d) for d in ds}
    links = {}
    for j in range(F):
        key = (int(graph.features[j, 0]), int(graph.features[j, 2]))
        if key in pages and bool(pruned.node_mask[j]):
            links[graph.node_name(j)] = f"dashboards/{pages[key]}"
    return links


def run(args: argparse.Namespace) -> int:
    from mechfaith.circuits.attribution_graph import GraphConfig
    from mechfaith.circuits.session import open_session
    from mechfaith.cli.dataclass_args import dataclass_from_args
    from mechfaith.errors import ConfigError

    cfg = dataclass_from_args(GraphConfig, args)
    if (args.prompt is None) == (not args.case_study):
        raise ConfigError("give --prompt, or --case-study for the built-in prompts")
    _check_args(args)
    t0 = time.perf_counter()
    session = open_session(args.model, args.coders, args.device)
    load = time.perf_counter() - t0
    if not args.case_study:
        make_graph(args, cfg, session, args.prompt, Path(args.out), load)
        return 0
    from mechfaith.atomic import atomic_dir, write_text_atomic
    from mechfaith.jsonio import write_json
    from mechfaith.reports.graph_case_study import case_study_markdown

    with atomic_dir(args.out) as tmp:
        rows = [make_graph(args, cfg, session, prompt, tmp / name, load, name=name, shown=Path(args.out) / name)
                for name, prompt in CASE_STUDY.items()]
        write_json(tmp / "case_study.json", rows)
        write_text_atomic(tmp / "case_study.md", case_study_markdown(rows))
    print(f"wrote {Path(args.out) / 'case_study.md'}")
    return 0


def make_graph(args: argparse.Namespace, cfg: Any, session: Any, prompt: str, out: Path, load: float,
               name: str | None = None, shown: Path | None = None) -> dict[str, Any]:
    """One prompt's graph, check, dashboards and files in ``out`` (printed as ``shown``); its summary row."""
    from mechfaith.atomic import atomic_dir
    from mechfaith.circuits.attribution_graph import build_attribution_graph
    from mechfaith.circuits.graph_check import check_graph
    from mechfaith.circuits.graph_json import graph_to_json, neuronpedia_json
    from mechfaith.circuits.replacement import record_run
    from mechfaith.circuits.session import meta_of
    from mechfaith.jsonio import write_json
    from mechfaith.reports.attribution_graph_page import write_attribution_graph_html

    ids = session.tokenize(prompt)
    strings = [session.token_str(int(t)) for t in ids]
    tokens = [session.token_id(t) for t in args.target] if args.target and not name else None
    minus = session.token_id(args.minus) if args.minus is not None and not name else -1
    t1 = time.perf_counter()
    run_ = record_run(session.lm.model, ids, session.transcoders, token_strings=strings)
    graph = build_attribution_graph(run_, cfg, pos=args.position, tokens=tokens, minus=minus,
                                    progress=_bar(args, "graph rows"))
    pruned = graph.prune()
    t2 = time.perf_counter()
    check = check_graph(session.lm.model, run_, graph, args.check, _bar(args, "check")) if args.check else None
    t3 = time.perf_counter()
    logit_strings = [session.token_str(t) for t in graph.logits.tokens]
    top = top_features(session, graph)
    meta = {**meta_of(session), "prompt": prompt, "slug": name or Path(args.out).name,
            "seconds": {"load": load, "graph": t2 - t1, "check": t3 - t2}, "feature_share": graph.feature_share,
            "top_features": top, "check": check.to_dict() if check else None}
    with atomic_dir(out) as tmp:
        links = _dashboards(args, session, graph, pruned, tmp)
        data = graph_to_json(graph, pruned, meta, logit_strings=logit_strings)
        write_json(tmp / "graph.json", data)
        write_json(tmp / "neuronpedia.json", neuronpedia_json(graph, pruned, meta, logit_strings=logit_strings))
        write_attribution_graph_html(data, tmp / "graph.html", f"Attribution graph: {prompt[:60]!r}", links)
    _report(graph, pruned, check, strings, logit_strings, data, t2 - t1, shown or out)
    return {"name": name or out.name, "prompt": prompt, "n_tokens": len(strings), "target": strings[graph.logits.pos],
            "logits": [{"token": t, "p": float(p)} for t, p in zip(logit_strings, graph.logits.probabilities)][:3],
            "n_active": graph.n_active, "feature_nodes": graph.blocks.n_features,
            "kept_nodes": int(pruned.node_mask.sum()), "kept_links": int(pruned.edge_mask.sum()),
            "replacement_score": data["replacement_score"], "completeness_score": data["completeness_score"],
            "feature_share": graph.feature_share[0] if graph.feature_share else float("nan"),
            "seconds": t2 - t1, "check": meta["check"], "top_features": top[:5]}


def top_features(session: Any, graph: Any, n: int = 10, k: int = 5) -> list[dict[str, Any]]:
    """The ``n`` most influential feature nodes with activation, influence and top de-embedding tokens."""
    import torch

    from mechfaith.circuits.parts import model_parts
    from mechfaith.circuits.pullback import de_embedding, top_k

    F = graph.blocks.n_features
    parts = model_parts(session.lm.model)
    infl = graph.influence()[:F]
    rows = []
    for j in torch.argsort(infl, descending=True)[:n].tolist():
        l, p, i = (int(v) for v in graph.features[j])
        with torch.no_grad():
            de = top_k(de_embedding(parts, session.transcoders[l], i), k)
        rows.append({"node": graph.node_name(j), "influence": float(infl[j]),
                     "activation": float(graph.activations[j]), "token": session.token_str(graph.tokens[p]),
                     "de_embedding": [session.token_str(t) for t, _ in de.top]})
    return rows


def _report(graph: Any, pruned: Any, check: Any, strings: list[str], logit_strings: list[str],
            data: dict[str, Any], seconds: float, out: Path) -> None:
    lg = graph.logits
    top = ", ".join(f"{logit_strings[k]!r} p={float(lg.probabilities[k]):.3f}" for k in range(min(3, len(lg.tokens))))
    print(f"{len(strings)} tokens, {graph.n_active} active features, {graph.blocks.n_features} feature nodes "
          f"({seconds:.1f} s); target {strings[lg.pos]!r} -> {top}")
    print(f"replacement score {data['replacement_score']:.3f}, completeness score {data['completeness_score']:.3f}; "
          f"pruned: {int(pruned.node_mask.sum())} nodes, {int(pruned.edge_mask.sum())} links")
    if check is not None:
        print(f"check ({len(check.features)} features, {check.target}): Spearman "
              + ", ".join(f"{w} {v:.3f}" for w, v in check.spearman.items()) + "; median relative error "
              + ", ".join(f"{w} {v:.3f}" for w, v in check.median_rel_error.items()))
    print(f"wrote {out / 'graph.json'}, {out / 'neuronpedia.json'}, {out / 'graph.html'}")
