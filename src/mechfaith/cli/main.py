"""The ``mechfaith`` command: one sub-command per capability (see ``mechfaith --help``).

Every sub-command lives in its own module under ``mechfaith.cli`` listed in
:data:`COMMAND_MODULES`; each defines ``add_parser(subparsers)`` (which sets ``func=run``) and
``run(args) -> int``. Errors that mechfaith raises on purpose, and OS errors, become one line on
stderr (``mechfaith: error: ...``) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mechfaith import __version__
from mechfaith.errors import MechfaithError, TrainingDiverged

COMMAND_MODULES: tuple[str, ...] = ("toy", "train", "inspect_cmd", "lm", "faithfulness", "circuit",
                                    "dashboard")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 1


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="mechfaith",
        description="Transcoders you can trust: train sparse coders, test their mechanistic "
                    "faithfulness, analyse circuits.")
    parser.add_argument("--version", action="version", version=f"mechfaith {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"mechfaith.cli.{name}")
        module.add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    from mechfaith.perf import tune_malloc

    tune_malloc()
    try:
        code = args.func(args)
    except TrainingDiverged as exc:
        print(f"mechfaith: error: training diverged: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MechfaithError, OSError) as exc:
        print(f"mechfaith: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mechfaith: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(code or 0)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
