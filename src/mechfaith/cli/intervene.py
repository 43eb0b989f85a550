"""``mechfaith intervene``: run a prompt with transcoder features ablated, scaled or set.

Each --feature is ``LAYER:INDEX[@POS]`` (ablate; no ``@POS``: at every position), ``...*FACTOR``
(scale) or ``...=VALUE`` (set), e.g. ``8:355@7``, ``mlp8tc[355]@7*2``, ``12:40=5``. The prompt runs
in the replacement model (every layer of --coders replaced by its transcoder, errors added back, so
that without interventions it reproduces the model) in the frozen world (attention patterns and
norm scales frozen: the attribution graph's world), the live world (the real model), or both.
With --linear, features respond on their recorded active sets (the graph's linearisation). Prints,
per world, the top predictions before and after at --position, the tokens whose logits changed
most, and the features whose activations changed most; --out saves it all as JSON.
"""

from __future__ import annotations

import argparse
from typing import Any

from mechfaith.cli.arg_types import device, positive_int
from mechfaith.cli.circuit import add_coder_args
from mechfaith.cli.out_guard import add_overwrite_option, check_out_file, json_written_by

OWN_KEYS = ("prompt", "position", "interventions", "tokens")  # an intervene --out written before its "command"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("intervene", help="run a prompt with features ablated, scaled or set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_coder_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text (BOS is prepended)")
    p.add_argument("--feature", nargs="+", required=True, metavar="SPEC",
                   help="LAYER:INDEX[@POS] (ablate), LAYER:INDEX[@POS]*FACTOR (scale), LAYER:INDEX[@POS]=VALUE (set)")
    p.add_argument("--world", choices=("frozen", "live", "both"), default="both",
                   help="frozen attention and norms (the graph's world), the live model, or both")
    p.add_argument("--linear", action="store_true",
                   help="features respond on their recorded active sets (the graph's linearisation) instead of "
                        "being recomputed by their activation (TopK re-selecting its k)")
    p.add_argument("--position", type=int, default=-1, help="position whose logits are shown (negative: from the end)")
    p.add_argument("--top", type=positive_int, default=10, help="rows of each table")
    p.add_argument("--device", type=device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_overwrite_option(p, "replace an existing --out file that intervene did not write")
    p.set_defaults(func=run)


def _changes(before: Any, after: Any, run_: Any, pos: int, top: int, token_str: Any) -> dict[str, Any]:
    import torch

    p0, p1 = torch.softmax(before.logits[pos].double(), -1), torch.softmax(after.logits[pos].double(), -1)
    d = after.logits[pos] - after.logits[pos].mean() - (before.logits[pos] - before.logits[pos].mean())
    order = torch.argsort(d.abs(), descending=True)[:top]
    feats: list[dict[str, Any]] = []
    for l in sorted(run_.transcoders):
        diff = (after.activations[l] - before.activations[l]).abs()
        vals, idx = diff.flatten().topk(min(top, diff.numel()))
        for v, i in zip(vals.tolist(), idx.tolist()):
            q, f = divmod(i, diff.shape[1])
            if v > 0:
                feats.append({"feature": f"mlp{l}tc[{f}]@{q}", "before": float(before.activations[l][q, f]),
                              "after": float(after.activations[l][q, f])})
    feats.sort(key=lambda r: -abs(r["after"] - r["before"]))
    return {
        "top_before": [{"token": token_str(int(t)), "p": float(p0[t])} for t in p0.topk(top).indices],
        "top_after": [{"token": token_str(int(t)), "p": float(p1[t])} for t in p1.topk(top).indices],
        "logit_changes": [{"token": token_str(int(t)), "token_id": int(t), "change": float(d[t])} for t in order],
        "feature_changes": feats[:top]}


def _print(world: str, res: dict[str, Any]) -> None:
    print(f"[{world}] top predictions before: " + ", ".join(f"{r['token']!r} {r['p']:.3f}" for r in res["top_before"][:5]))
    print(f"[{world}] top predictions after:  " + ", ".join(f"{r['token']!r} {r['p']:.3f}" for r in res["top_after"][:5]))
    print(f"[{world}] largest demeaned-logit changes: "
          + ", ".join(f"{r['token']!r} {r['change']:+.3f}" for r in res["logit_changes"]))
    for r in res["feature_changes"]:
        print(f"[{world}]   {r['feature']}: {r['before']:.4g} -> {r['after']:.4g}")


def run(args: argparse.Namespace) -> int:
    from mechfaith.circuits.interventions import check_interventions, parse_intervention, run_frozen, run_live
    from mechfaith.circuits.replacement import record_run
    from mechfaith.circuits.session import open_session, resolve_pos
    from mechfaith.jsonio import write_json

    ivs = [parse_intervention(s) for s in args.feature]
    if args.out is not None:
        check_out_file(args.out, json_written_by(("intervene",), OWN_KEYS), overwrite=args.overwrite)
    session = open_session(args.model, args.coders, args.device)
    ids = session.tokenize(args.prompt)
    pos = resolve_pos(args.position, int(ids.shape[0]))
    run_ = record_run(session.lm.model, ids, session.transcoders)
    check_interventions(run_, ivs)
    out: dict[str, Any] = {"command": "intervene", "prompt": args.prompt, "position": pos,
                           "interventions": [iv.name for iv in ivs], "tokens": [session.token_str(int(t)) for t in ids]}
    worlds = ("frozen", "live") if args.world == "both" else (args.world,)
    for world in worlds:
        mode = "linear" if args.linear else "nonlinear"
        if world == "frozen":
            before, after = run_frozen(run_, features=mode), run_frozen(run_, ivs, features=mode)
        else:
            model = session.lm.model
            before, after = run_live(model, run_, features=mode), run_live(model, run_, ivs, features=mode)
        out[world] = _changes(before, after, run_, pos, args.top, session.token_str)
        _print(world, out[world])
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0
