"""``mechfaith toy multihop``: the multi-hop faithfulness toy, end to end.

Trains per-layer transcoders, cross-layer transcoders at several sparsity levels and a CLT with
Jacobian matching (several seeds each, all at once) on a hand-built residual network whose MLPs
compute chained ANDs, measures whether the CLTs replace the multi-step circuit by a shortcut that
reads the raw inputs, and writes into ``--out``: metrics.json (with a ``claims`` object),
report.html (self-contained), report.md and the PNG figures. ``--quick``: a smaller run with the
same outputs (a smoke test).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mechfaith.cli.dataclass_args import DefaultsFormatter, add_dataclass_args, add_quiet_option, config_with_quick
from mechfaith.cli.out_guard import add_overwrite_option, new_output
from mechfaith.toy.multihop import QUICK, MultihopConfig, run_multihop

OWN_NAMES = ("metrics.json", "report.html", "report.md", "*.png")  # what write_multihop_outputs writes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "multihop", help="the multi-hop toy: do cross-layer transcoders take shortcuts? (numbers, figures, report)",
        description=__doc__, formatter_class=DefaultsFormatter)
    p.add_argument("--out", default="multihop-report", help="output folder: new, empty, or an earlier multihop "
                                                            "report (replaced whole once the new one is complete)")
    add_overwrite_option(p)
    p.add_argument("--quick", action="store_true", help="a smaller run with the same outputs (smoke test)")
    p.add_argument("--config", default=None, help="TOML or YAML file with MultihopConfig values "
                                                   "(top level or a [multihop] section)")
    add_quiet_option(p, "hide the progress bar")
    add_dataclass_args(p, MultihopConfig)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> MultihopConfig:
    """Built-in defaults < the --quick preset < the config file < flags on the command line."""
    return config_with_quick(MultihopConfig, args, "multihop", QUICK)


def run(args: argparse.Namespace) -> int:
    from mechfaith.reports.multihop_report import write_multihop_outputs  # matplotlib: only when needed

    cfg = build_config(args)
    out = Path(args.out)
    with new_output(out, OWN_NAMES, "multihop report", overwrite=args.overwrite) as tmp:
        mh_run = run_multihop(cfg, progress=not bool(getattr(args, "quiet", False)))
        write_multihop_outputs(mh_run, tmp)
    s = mh_run.metrics["settings"]
    for name, v in s.items():
        print(f"{name:16s} cross-layer share {v['cross_layer_share']['mean']:.2f}"
              f"  reads intermediate {v['intermediate_read_share']['mean']:.2f}"
              f"  ablation response {v['ablation_response']['mean']:.2f}"
              f"  later Jacobian error {v['later_jacobian_rel_error']['mean']:.2f}  FVU {v['fvu']['mean']:.3f}")
    c = mh_run.metrics["claims"]
    refuted = [k for k, v in c.items() if not v["ok"]]
    print(f"claims: {len(c) - len(refuted)} hold" + (f", refuted: {', '.join(refuted)}" if refuted else ""))
    print(f"wrote {out / 'report.html'} ({mh_run.metrics['timing']['total_seconds']:.0f} s)")
    sys.stdout.flush()
    return 0
