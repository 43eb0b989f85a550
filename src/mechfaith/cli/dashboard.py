"""``mechfaith dashboard``: static HTML dashboards of transcoder features.

For each feature (``--features 8:355,8:12``, or ``8:top20`` for the 20 densest features of layer 8
on the contexts) one page: activation density and histogram, examples in activation bands with
tokens shaded by activation, top de-embedding tokens, top logit effects, top pullbacks from the
previous transcoder layer; plus ``index.html`` over all of them, in --out. The examples come from the
held-out (validation) contexts of the corpus.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mechfaith.cli.arg_types import device, int_at_least, positive_int
from mechfaith.cli.circuit import add_coder_args
from mechfaith.cli.out_guard import add_overwrite_option, new_output

OWN_NAMES = ("index.html", "feature_L*_*.html")  # what dashboard writes into its --out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dashboard", help="HTML dashboards of transcoder features",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_coder_args(p)
    p.add_argument("--features", required=True, help="LAYER:INDEX,... or LAYER:topN (densest N)")
    p.add_argument("--corpus-source", default="shakespeare", help="corpus (see mechfaith lm)")
    p.add_argument("--context-length", type=int_at_least(2), default=64, help="tokens per context")
    p.add_argument("--contexts", type=positive_int, default=128, help="contexts scanned for examples")
    p.add_argument("--k", type=positive_int, default=10, help="rows of each top-k table")
    p.add_argument("--per-band", type=positive_int, default=5, help="examples per activation band")
    p.add_argument("--device", type=device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    p.add_argument("--out", default="dashboards", help="output folder")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mechfaith.circuits.dashboard_data import feature_dashboards
    from mechfaith.circuits.roots import select_features
    from mechfaith.circuits.session import open_session
    from mechfaith.lm.corpus import CorpusConfig, eval_contexts
    from mechfaith.reports.dashboard import write_dashboards

    out = Path(args.out)
    with new_output(out, OWN_NAMES, "dashboard", overwrite=args.overwrite) as tmp:
        session = open_session(args.model, args.coders, args.device)
        contexts, where = eval_contexts(session.lm, CorpusConfig(source=args.corpus_source,
                                                                 context_length=args.context_length), args.contexts)
        features = select_features(args.features, session.lm.model, session.transcoders, contexts)
        ds = feature_dashboards(session.lm.model, session.transcoders, contexts, features, session.token_str,
                                k=args.k, per_band=args.per_band)
        paths = write_dashboards(ds, tmp, title=f"Features of {session.lm.name} ({where})")
    print(f"wrote {len(paths) - 1} feature pages and {out / paths[0].name}")
    return 0
