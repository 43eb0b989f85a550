"""``mechfaith convert SRC --to FORMAT --out DST``: a coder or a set from any format mechfaith reads
into mechfaith, SAELens or sparsify files.

SRC (told from its files): a mechfaith coder folder or run folder, a mechfaith set (set.json), a
SAELens folder, a sparsify folder or run, a legacy GPT-2 transcoder .pt. FORMAT: mechfaith,
saelens, sparsify or circuit-tracer (sets and cross-layer transcoders only; dictionary-learning: not
yet supported). A set becomes a set: a mechfaith set, one SAELens folder per layer (DST/L<l>/) or a
sparsify run (DST/<hookpoint>/). A cross-layer transcoder (a mechfaith CLT folder, or circuit-tracer's
W_enc_<i>/W_dec_<i>.safetensors) becomes a mechfaith CLT folder or circuit-tracer's CLT files. What
the target cannot hold is refused in one line, nothing written. DST is written whole, only when it is
new, empty, or a conversion of the same kind written before (--overwrite: any other folder or file
there, replaced whole once the conversion is complete).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from mechfaith.cli.out_guard import add_overwrite_option

FORMAT_CHOICES = ("mechfaith", "saelens", "sparsify", "circuit-tracer", "dictionary-learning")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("convert", help="convert a coder or a set between mechfaith, SAELens and sparsify files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="a coder or set in any format mechfaith reads")
    p.add_argument("--to", required=True, choices=FORMAT_CHOICES, metavar="FORMAT",
                   help=f"the format to write: {', '.join(FORMAT_CHOICES)}")
    p.add_argument("--out", required=True, metavar="DST", help="the folder to write")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mechfaith.lm.convert import convert
    from mechfaith.lm.formats import FORMATS
    from mechfaith.lm.layer_set import layers_text

    if args.overwrite and Path(args.out).exists():
        r = _convert_over(args)
    else:
        r = convert(args.source, args.to, args.out)
    source = FORMATS[r.source_format]
    if r.folders:
        print(f"wrote a {r.target} set of layers {layers_text(r.folders)} in {r.out} from the {source} {r.source}")
    else:
        layer = "" if r.layer is None else f", layer {r.layer}"
        print(f"wrote {r.target} folder {r.out} ({r.kind}{layer}) from the {source} {r.source}")
    return 0


def _convert_over(args: argparse.Namespace) -> Any:
    """``--overwrite`` over an existing DST: convert into a temporary folder beside it, which then
    replaces DST whole (DST untouched if the conversion fails)."""
    from mechfaith.atomic import atomic_dir, check_replaceable
    from mechfaith.lm.convert import check_apart, convert

    out = Path(args.out)
    check_apart(Path(args.source), out)
    check_replaceable(out, (), "conversion", overwrite=True)  # never the current folder or one holding it
    with atomic_dir(out) as tmp:
        r = convert(args.source, args.to, tmp / "result")
        for child in (tmp / "result").iterdir():
            shutil.move(str(child), str(tmp / child.name))
        (tmp / "result").rmdir()
    r.out = out
    return r
