"""A cross-layer transcoder against the per-layer transcoders of a set over the same block of layers.

    python benchmarks/clt_vs_set.py --clt runs/clt10-15 --set runs/set --out runs/clt_vs_set.json [--graphs]

Both are measured by the same code (the set's block as a reach-0 CLT, :func:`set_block_as_clt`) on
the same held-out contexts: spliced CE and KL over the whole block (BOS and attention sinks keep the
model's MLP output, as ``lm eval`` does), L0 per token summed over the block, per-layer FVE and
parameters. ``--graphs``: the attribution graphs of the case-study prompts (``mechfaith graph
--case-study``) with only the block's layers replaced (every other MLP is an error node), and their
replacement and completeness scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from mechfaith.circuits.attribution_graph import GraphConfig, build_attribution_graph
from mechfaith.circuits.replacement import record_run
from mechfaith.circuits.session import open_session
from mechfaith.cli.graph import CASE_STUDY
from mechfaith.coders.clt_files import load_clt, read_clt_meta
from mechfaith.configs import config_from_dict
from mechfaith.lm.clt_eval import CLTEvalResult, evaluate_clt_on, set_block_as_clt
from mechfaith.lm.coder_set import set_coder_folders
from mechfaith.lm.config import MASSIVE_RATIO, LMConfig
from mechfaith.lm.corpus import CorpusConfig, eval_contexts
from mechfaith.lm.model_cache import get_model


def _row(name: str, e: CLTEvalResult) -> dict[str, Any]:
    return {"name": name, "parameters": e.n_parameters, "ce_clean": e.ce_clean, "ce_spliced": e.ce_spliced,
            "ce_increase": e.ce_increase, "kl": e.kl_spliced, "ce_zero_ablated": e.ce_zero_ablated,
            "loss_recovered": e.loss_recovered, "l0_token": e.l0_token,
            "fve": {str(p.layer): p.fve for p in e.per_layer}, "dead": {str(p.layer): p.dead_fraction for p in e.per_layer}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clt", required=True, help="an lm train --clt run folder (or its clt/ folder)")
    ap.add_argument("--set", required=True, help="a coder set (lm train --layers) covering the CLT's block")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--eval-contexts", type=int, default=16)
    ap.add_argument("--graphs", action="store_true", help="also the case-study attribution graphs")
    ap.add_argument("--whole-model", action="store_true",
                    help="graphs with every other layer replaced by the set's transcoders too (the set at every "
                         "layer vs the CLT in the block and the set elsewhere); skips the block-only evaluation")
    args = ap.parse_args()
    clt_folder = Path(args.clt) / "clt" if (Path(args.clt) / "clt").is_dir() else Path(args.clt)
    meta = read_clt_meta(clt_folder)["training"]
    clt = load_clt(clt_folder)
    layers = clt.cfg.layers
    cfg = dataclasses.replace(LMConfig(), model=meta["model"], eval_contexts=args.eval_contexts)
    lm = get_model(cfg)
    corpus_cfg = config_from_dict(CorpusConfig, meta["corpus"]) if meta.get("corpus") else CorpusConfig()
    contexts, source = eval_contexts(lm, corpus_cfg, cfg.eval_contexts)
    per_layer, _ = set_block_as_clt(args.set, layers)
    rows = []
    for name, model in () if args.whole_model else (("per-layer transcoders", per_layer), ("CLT", clt)):
        t0 = time.perf_counter()
        e = evaluate_clt_on(lm.adapter, model, contexts, batch_contexts=cfg.batch_contexts, keep_bos=True,
                            keep_massive=MASSIVE_RATIO)
        rows.append({**_row(name, e), "eval_seconds": round(time.perf_counter() - t0, 1)})
    result: dict[str, Any] = {"model": lm.name, "layers": layers, "eval_tokens": int(contexts.numel()),
                              "eval_source": source, "rows": rows}
    if args.graphs:
        folders = set_coder_folders(args.set)
        specs = {"per-layer transcoders": [f"{l}={folders[l]}" for l in layers], "CLT": [str(clt_folder)]}
        if args.whole_model:
            others = [f"{l}={p}" for l, p in folders.items() if l not in layers]
            specs = {"per-layer transcoders at every layer": [args.set],
                     "CLT in the block, per-layer elsewhere": [str(clt_folder), *others]}
        graphs = []
        for name, spec in specs.items():
            session = open_session(lm.name, spec)
            for prompt_name, prompt in CASE_STUDY.items():
                t0 = time.perf_counter()
                run = record_run(session.lm.model, session.tokenize(prompt), session.transcoders)
                g = build_attribution_graph(run, GraphConfig())
                s = g.scores()
                graphs.append({"coders": name, "prompt": prompt_name, "tokens": run.seq_len, "active": g.n_active,
                               "replacement": s.replacement_score, "completeness": s.completeness_score,
                               "seconds": round(time.perf_counter() - t0, 1)})
                print(json.dumps(graphs[-1]), flush=True)
        result["graphs"] = graphs
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'':24s} {'params':>11s} {'CE':>7s} {'+CE':>7s} {'KL':>7s} {'rec.':>6s} {'L0/tok':>7s}  FVE per layer")
    for r in rows:
        fves = " ".join(f"{v:.3f}" for v in r["fve"].values())
        print(f"{r['name']:24s} {r['parameters']:11,d} {r['ce_spliced']:7.4f} {r['ce_increase']:+7.4f} {r['kl']:7.4f} "
              f"{r['loss_recovered']:6.3f} {r['l0_token']:7.1f}  {fves}")


if __name__ == "__main__":
    main()
