"""``mechfaith faithfulness``: how faithfully a transcoder imitates the MLP it replaces.

- ``report CODER``: for a trained transcoder of a language-model MLP (a run folder or coder folder
  written by ``mechfaith lm train``), measure on held-out tokens: the Jacobian relative error
  (JVP estimate with its standard error; BOS vs other positions), the singular-value spectra of
  the exact Jacobians, datapoint features (optionally on a sample with a planted repeated
  passage), the error off distribution (shuffled tokens, another text, noise) and gradient-masking
  signs. Writes ``faithfulness.json`` and a self-contained ``report.html`` into --out (default:
  ``RUN/faithfulness/`` beside the coder). For a set folder (``set.json``, from ``lm train
  --layers``) the report is of one layer, chosen with ``--layer L`` (default out:
  ``SET/layers/L<l>/faithfulness/``); without ``--layer`` the error lists the set's layers.
- ``experiment``: the toy model's question on a real LM. Plant a repeated passage into a share of
  the training contexts (0%, 1%, 5%), train transcoders of one MLP with and without Jacobian
  matching, in arms (TopK, ReLU with the toy's tanh-L1, JumpReLU; with or without a linear skip),
  at two sites more (a list of numbers as the passage, an early layer), and report per cell
  memorization of the passage, the features at least 10x more active on the passage than on any
  held-out token (with their top tokens), which part of the coder (linear part, features) carries
  the passage's fit, Jacobian error (held out and on the passage), FVE, L0 and spliced CE, with
  plain-language findings. Writes ``experiment.json`` and ``report.html`` into --out. About 45
  minutes for SmolLM2-135M on 2 CPU cores (finished cells are reused); ``--quick`` about 6.

Config file sections: report: [faithfulness], [datapoints], [masking], [lm_faithfulness];
experiment: [experiment], [corpus].
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from mechfaith.reports.values import fmt_value

log = logging.getLogger(__name__)

SECTIONS = ("faithfulness", "datapoints", "masking", "lm_faithfulness")
REPORT_NAMES = ("faithfulness.json", "report.html")  # what a report writes into its --out
EXPERIMENT_NAMES = ("experiment.json", "report.html", "cells")  # what an experiment writes into its --out



def add_parser(subparsers) -> None:
    from mechfaith.cli.arg_types import device
    from mechfaith.cli.dataclass_args import DefaultsFormatter, add_dataclass_args, add_quiet_option
    from mechfaith.cli.out_guard import add_overwrite_option
    from mechfaith.faithfulness.datapoints import DatapointConfig
    from mechfaith.faithfulness.masking import MaskingConfig
    from mechfaith.faithfulness.report import FaithfulnessConfig
    from mechfaith.lm.faithfulness import LMFaithfulnessConfig

    top = subparsers.add_parser("faithfulness", help="mechanistic faithfulness of a transcoder to its MLP",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="faithfulness_command", metavar="{report,experiment}")
    sub.required = True
    p = sub.add_parser("report", help="faithfulness report (JSON + HTML) of a trained LM transcoder",
                       formatter_class=DefaultsFormatter)
    p.add_argument("coder", help="run folder or coder folder (from mechfaith lm train), a SAELens folder, or a set "
                                 "folder (set.json, from lm train --layers) with --layer")
    p.add_argument("--out", default=None, help="output folder (default: faithfulness/ beside the coder)")
    add_overwrite_option(p)
    p.add_argument("--config", default=None, help="TOML or YAML file with sections " + ", ".join(f"[{s}]" for s in SECTIONS))
    p.add_argument("--model", default=None, help="model (default: the one the coder was trained on)")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the coder's); for a set: which "
                                                              "layer's coder to report on (required)")
    p.add_argument("--corpus-source", default=None, help="text source (default: the coder's corpus)")
    p.add_argument("--device", type=device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the model's weights")
    add_quiet_option(p, "hide progress")
    add_dataclass_args(p.add_argument_group("measurements"), FaithfulnessConfig,
                       exclude={"datapoints", "masking"})
    add_dataclass_args(p.add_argument_group("tokens"), LMFaithfulnessConfig)
    add_dataclass_args(p.add_argument_group("datapoint detector"), DatapointConfig, prefix="dp-")
    add_dataclass_args(p.add_argument_group("gradient-masking detector"), MaskingConfig, prefix="masking-")
    p.set_defaults(func=run, faithfulness_func=_run_report)
    _add_experiment_parser(sub)


def _add_experiment_parser(sub) -> None:
    from mechfaith.cli.dataclass_args import DefaultsFormatter, add_dataclass_args, add_quiet_option
    from mechfaith.cli.out_guard import add_overwrite_option
    from mechfaith.lm.corpus import CorpusConfig
    from mechfaith.studies.memorization import ExperimentConfig

    p = sub.add_parser("experiment", help="does a transcoder memorize a repeated passage; does Jacobian "
                       "matching prevent it (JSON + HTML)", formatter_class=DefaultsFormatter)
    p.add_argument("--out", default="runs/experiment", help="output folder (an experiment's own folder: finished "
                                                             "cells are kept)")
    add_overwrite_option(p)
    p.add_argument("--quick", action="store_true", help="the small variant (one site, arms topk and "
                   "relu-tanh, 2 rates, 100 steps; a few minutes); flags and the config file still override it")
    p.add_argument("--config", default=None, help="TOML or YAML file with sections [experiment], [corpus]")
    add_quiet_option(p, "hide progress")
    add_dataclass_args(p.add_argument_group("experiment"), ExperimentConfig)
    add_dataclass_args(p.add_argument_group("corpus"), CorpusConfig, prefix="corpus-")
    p.set_defaults(func=run, faithfulness_func=_run_experiment)


def _file_sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from mechfaith.cli.dataclass_args import load_config_sections

    return load_config_sections(getattr(args, "config", None), SECTIONS)


def configs(args: argparse.Namespace):
    """(FaithfulnessConfig, LMFaithfulnessConfig) from defaults < config file < flags."""
    from mechfaith.cli.dataclass_args import dataclass_from_args
    from mechfaith.faithfulness.datapoints import DatapointConfig
    from mechfaith.faithfulness.masking import MaskingConfig
    from mechfaith.faithfulness.report import FaithfulnessConfig
    from mechfaith.lm.faithfulness import LMFaithfulnessConfig

    files = _file_sections(args)
    dp = dataclass_from_args(DatapointConfig, args, prefix="dp-", file_values=files["datapoints"])
    mk = dataclass_from_args(MaskingConfig, args, prefix="masking-", file_values=files["masking"])
    fvals = {k: v for k, v in files["faithfulness"].items() if k not in ("datapoints", "masking")}
    fcfg = dataclass_from_args(FaithfulnessConfig, args, file_values=fvals)
    fcfg = dataclasses.replace(fcfg, datapoints=dp, masking=mk)
    lcfg = dataclass_from_args(LMFaithfulnessConfig, args, file_values=files["lm_faithfulness"])
    return fcfg, lcfg


def _run_experiment(args: argparse.Namespace) -> int:
    from mechfaith.cli.dataclass_args import dataclass_from_args, load_config_sections
    from mechfaith.cli.out_guard import run_output
    from mechfaith.lm.corpus import CorpusConfig
    from mechfaith.reports.experiment_report import write_experiment_html
    from mechfaith.studies.memorization import QUICK, ExperimentConfig, run_experiment

    files = load_config_sections(getattr(args, "config", None), ("experiment", "corpus"))
    base = dict(QUICK) if args.quick else {}
    cfg = dataclass_from_args(ExperimentConfig, args, file_values={**base, **files["experiment"]})
    corpus_cfg = dataclass_from_args(CorpusConfig, args, prefix="corpus-", file_values=files["corpus"])
    out = Path(args.out)
    with run_output(out, EXPERIMENT_NAMES, "faithfulness experiment", overwrite=args.overwrite) as folder:
        rep = run_experiment(cfg, corpus_cfg, folder, progress=not getattr(args, "quiet", False))
        write_experiment_html(rep.to_json(), folder / "report.html",
                              f"Memorization of a repeated passage by transcoders of {rep.model} "
                              f"layers {', '.join(map(str, rep.layers))}")
    _print_table(rep.table)
    for line in rep.findings:
        print("- " + line)
    print(f"wrote {out / 'experiment.json'} and {out / 'report.html'} ({rep.seconds:.0f} s)")
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = ("passage", "layer", "arm", "k", "rate", "JM", "memorization", "passage feats", "10x feats",
            "10x share", "passage/held-out MSE", "linear alone", "feature share P (H)", "passage Jac err",
            "held-out Jac err", "FVE (train)", "L0", "CE +")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([str(r["passage"]), str(r["layer"]), str(r["arm"]), str(r["k"] or "-"),
                          f"{100 * r['rate']:g}%", f"{r['jacobian_coef']:g}",
                          fmt_value(r["memorization"], r["memorization_sd"]), fmt_value(r["n_passage_features"]),
                          fmt_value(r["n_specific_features"]), fmt_value(r["specific_share"]),
                          fmt_value(r["passage_mse_ratio"], r["passage_mse_ratio_sd"]),
                          fmt_value(r["linear_passage_mse_ratio"]),
                          f"{fmt_value(r['passage_feature_share'])} ({fmt_value(r['heldout_feature_share'])})",
                          fmt_value(r["passage_jacobian_rel"]), fmt_value(r["jacobian_rel"], r["jacobian_rel_sd"]),
                          f"{fmt_value(r['fve'])} ({fmt_value(r['train_fve'])})", fmt_value(r["l0"]),
                          fmt_value(r["ce_increase"], r["ce_increase_sd"])]))


def run(args: argparse.Namespace) -> int:
    return int(args.faithfulness_func(args) or 0)


def _run_report(args: argparse.Namespace) -> int:
    from mechfaith.cli.out_guard import new_output
    from mechfaith.lm.coder_files import coder_corpus_with_source, coder_location
    from mechfaith.lm.coder_set import is_coder_set, set_layer_coder
    from mechfaith.lm.config import LMConfig
    from mechfaith.lm.faithfulness import default_faithfulness_dir, lm_faithfulness
    from mechfaith.reports.faithfulness_report import write_faithfulness_html

    fcfg, lcfg = configs(args)
    coder, layer_given = str(args.coder), args.layer is not None
    if is_coder_set(coder):  # --layer picks the set's coder (which knows its layer); it overrides nothing
        coder, layer_given = str(set_layer_coder(coder, args.layer)), False
    base = LMConfig()
    lm_cfg = dataclasses.replace(base, model=args.model or base.model,
                                 layer=args.layer if args.layer is not None else base.layer,
                                 device=args.device, dtype=args.dtype)
    folder = Path(args.out) if args.out is not None else default_faithfulness_dir(coder_location(coder))
    corpus_cfg = coder_corpus_with_source(coder, args.corpus_source)
    with new_output(folder, REPORT_NAMES, "faithfulness report", overwrite=args.overwrite) as tmp:
        rep = lm_faithfulness(coder, lm_cfg, corpus_cfg, fcfg, lcfg, out=tmp,
                              model_given=args.model is not None, layer_given=layer_given,
                              progress=not getattr(args, "quiet", False))
        write_faithfulness_html(rep.to_json(), tmp / "report.html",
                                f"Faithfulness of a transcoder of {rep.lm.model} layer {rep.lm.layer}")
    m = rep.measures
    jac = m["jacobian"]
    print(f"Jacobian relative error: all {fmt_value(jac['all']['rel_error'], jac['all']['rel_error_se'])}, "
          f"BOS {fmt_value(jac['bos']['rel_error'], jac['bos']['rel_error_se'])}, "
          f"other {fmt_value(jac['other']['rel_error'], jac['other']['rel_error_se'])}")
    print(f"FVE {fmt_value(m['fidelity']['other']['fve'])}, L0 {fmt_value(m['fidelity']['other']['l0'])} (non-BOS); "
          f"datapoint features flagged: {m['datapoints']['n_flagged']}; "
          f"masking features flagged: {m['masking']['n_flagged']}")
    ratios = ", ".join(f"{n} {fmt_value(s['rel_error_ratio'])}" for n, s in m["offdist"]["sets"].items()
                       if n != "on_distribution")
    print(f"off-distribution error ratios: {ratios}")
    print(f"wrote {folder / 'faithfulness.json'} and {folder / 'report.html'} ({rep.seconds:.0f} s)")
    return 0
