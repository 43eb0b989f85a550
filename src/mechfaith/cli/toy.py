"""``mechfaith toy``: the toy model of mechanistic (un)faithfulness, end to end.

Trains every coder of the experiment (baseline / repetition / repetition + Jacobian matching, the
L1 and Jacobian-contribution variants, the repeat_frac x lambda scan, several seeds each) as one
batched model, then writes into ``--out``: metrics.json, report.html (self-contained), report.md,
the PNG figures, and one example coder per setting under ``coders/`` (regular mechfaith coder
folders). ``--quick`` runs a smaller grid with the same outputs (a smoke test, well under a minute).

``mechfaith toy multihop --out DIR``: the multi-hop toy of cross-layer transcoders' shortcuts
(:mod:`mechfaith.cli.toy_multihop`; see ``mechfaith toy multihop --help``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mechfaith.cli import toy_multihop
from mechfaith.cli.dataclass_args import DefaultsFormatter, add_dataclass_args, add_quiet_option, config_with_quick
from mechfaith.cli.out_guard import add_overwrite_option, new_output
from mechfaith.coders.files import save_coder
from mechfaith.toy.experiments import QUICK, ToyConfig, run_toy

log = logging.getLogger(__name__)

OWN_NAMES = ("metrics.json", "report.html", "report.md", "*.png", "coders")  # what write_toy_outputs writes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "toy", help="reproduce the toy model of mechanistic (un)faithfulness (numbers, figures, report)",
        description=__doc__, formatter_class=DefaultsFormatter)
    p.add_argument("--out", default="toy-report", help="output folder: new, empty, or an earlier toy report "
                                                        "(replaced whole once the new one is complete)")
    add_overwrite_option(p)
    p.add_argument("--quick", action="store_true", help="a smaller run with the same outputs (smoke test)")
    p.add_argument("--config", default=None, help="TOML or YAML file with ToyConfig values "
                                                   "(top level or a [toy] section)")
    add_quiet_option(p, "hide the progress bar")
    add_dataclass_args(p, ToyConfig)
    p.set_defaults(func=run)
    toys = p.add_subparsers(dest="toy_command", metavar="TOY", required=False,
                            title="other toys (without one: the absolute-value toy above)")
    toy_multihop.add_parser(toys)



def build_config(args: argparse.Namespace) -> ToyConfig:
    """Built-in defaults < the --quick preset < the config file < flags on the command line."""
    return config_with_quick(ToyConfig, args, "toy", QUICK)


def run(args: argparse.Namespace) -> int:
    from mechfaith.reports.toy_report import write_toy_outputs  # matplotlib: import only when needed

    cfg = build_config(args)
    out = Path(args.out)
    with new_output(out, OWN_NAMES, "toy report", overwrite=args.overwrite) as tmp:
        quiet = bool(getattr(args, "quiet", False))
        toy_run = run_toy(cfg, progress=not quiet)
        write_toy_outputs(toy_run, tmp)
        for name, coder in toy_run.examples.items():
            save_coder(coder, tmp / "coders" / name,
                       training={"source": "mechfaith toy", "setting": name,
                                 **toy_run.metrics["settings"][name]["spec"]})
    s = toy_run.metrics["settings"]
    for name in ("baseline", "repetition", "repetition_jacobian"):
        if name in s:
            print(f"{name:22s} memorization {s[name]['memorization']:.3f} ± {s[name]['memorization_std']:.3f}"
                  f"  val FVU {s[name]['val_fvu']:.3f}  L0 {s[name]['l0']:.2f}"
                  f"  |J-J_mlp| at p {s[name]['jacobian_error_at_p']:.2f}")
    sp = toy_run.metrics["scan"]["spearman"]
    print(f"scan Spearman: product {sp['product']:.2f}, repeat_frac {sp['repeat_frac']:.2f}, "
          f"lambda {sp['sparsity_coef']:.2f}")
    failed = [k for k, v in toy_run.metrics["claims"].items() if not v["ok"]]
    print(f"claims: {len(toy_run.metrics['claims']) - len(failed)} hold"
          + (f", not shown: {', '.join(failed)}" if failed else ""))
    print(f"wrote {out / 'report.html'} ({toy_run.metrics['timing']['total_seconds']:.0f} s)")
    sys.stdout.flush()
    return 0
