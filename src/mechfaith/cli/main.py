"""The ``mechfaith`` command: one sub-command per capability (see ``mechfaith --help``).

Every sub-command lives in its own module under ``mechfaith.cli`` listed in
:data:`COMMAND_MODULES`; each defines ``add_parser(subparsers)`` (which sets ``func=run``) and
``run(args) -> int``. Errors that mechfaith raises on purpose, OS errors and every argparse error
(a missing, unknown or malformed option, in any sub-command) become one line on stderr
(``mechfaith: error: ...``) and exit 2, never a traceback or a usage block; Ctrl-C at any moment
(imports included) becomes ``mechfaith: interrupted`` and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from mechfaith import __version__
from mechfaith.errors import MechfaithError, TrainingDiverged

COMMAND_MODULES: tuple[str, ...] = ("toy", "train", "inspect_cmd", "lm", "faithfulness", "circuit",
                                    "graph", "intervene", "dashboard", "convert")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 1


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line ``mechfaith: error: <command>: <problem>`` (exit 2)
    instead of a usage block; sub-command parsers inherit the class (``--help`` still prints the help)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("mechfaith").strip()
        text = " ".join((f"{command}: {message}" if command else message).split())
        self.exit(EXIT_ERROR, f"mechfaith: error: {text}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every sub-command."""
    parser = OneLineParser(
        prog="mechfaith",
        description="Transcoders you can trust: train sparse coders, test their mechanistic "
                    "faithfulness, analyse circuits.")
    parser.add_argument("--version", action="version", version=f"mechfaith {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug); also accepted after the command")
    parser.add_argument("-q", "--quiet", dest="quiet_all", action="store_true",
                        help="hide progress bars (same as the command's own --quiet)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"mechfaith.cli.{name}")
        module.add_parser(sub)
    for p in _sub_parsers(parser):
        if "--verbose" not in p._option_string_actions and "-v" not in p._option_string_actions:
            p.add_argument("-v", "--verbose", dest="verbose_sub", action="count", default=0,
                           help="more log output (-v info, -vv debug)")
    return parser


def _sub_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (nested) sub-command parser below ``parser``."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found.append(child)
                found.extend(_sub_parsers(child))
    return found


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (nested) sub-command that ``args`` chose."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _command_parser(action.choices[chosen], args)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        text = f"{where}{exc.strerror}"
    else:
        text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse errors, ``--help`` and ``--version``
    exit through :class:`SystemExit`)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # also while the commands' modules (torch, transformers) are imported
        print("mechfaith: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser, so that the error names the command
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.quiet_all:
        args.quiet = True
    verbosity = args.verbose + getattr(args, "verbose_sub", 0)
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    from mechfaith.perf import tune_malloc

    tune_malloc()
    try:
        code = args.func(args)
    except BrokenPipeError:  # e.g. `mechfaith inspect X | head`: stop quietly
        try:  # keep the interpreter's final flush of stdout from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_INTERRUPTED
    except TrainingDiverged as exc:
        msg = _one_line(exc)
        if not msg.lower().startswith("training diverged"):
            msg = f"training diverged: {msg}"
        print(f"mechfaith: error: {msg}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MechfaithError, OSError) as exc:
        print(f"mechfaith: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return int(code or 0)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
