"""Running a command in-process on generated input and checking the README's promise: exit 0 or 2 (1 only
for a diverged training run), never a traceback, an error as ONE line ``mechfaith: error: ...``, and no
file outside the command's output changed. Also the shared hypothesis settings of the suite."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from hypothesis import HealthCheck, event, settings

from mechfaith.cli.main import main
from mechfaith.errors import MechfaithError


def fuzz_settings(n: int) -> settings:
    """``n`` generated cases, reproducible (derandomized, no example database), no deadline. For a longer
    hunt outside CI: ``MECHFAITH_FUZZ_SCALE=20`` runs 20 times as many cases, and ``MECHFAITH_FUZZ_RANDOM=1``
    draws new ones on every run (a failure prints its ``@reproduce_failure`` blob)."""
    scale = float(os.environ.get("MECHFAITH_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, round(n * scale)), deadline=None, print_blob=True,
                    derandomize=os.environ.get("MECHFAITH_FUZZ_RANDOM", "") in ("", "0"), database=None,
                    suppress_health_check=list(HealthCheck))


def tree(root: Path, skip: Path | None = None) -> dict[str, Any]:
    """Every entry under ``root`` but ``skip`` (and what is inside it): name -> bytes, "dir" or the link."""
    found: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        rel = str(p.relative_to(root))
        found[rel] = f"link:{p.readlink()}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return found


@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh folder for one generated case, removed after it."""
    root = Path(tempfile.mkdtemp(prefix="mechfaith-fuzz-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_outcome(code: Any, err: str, argv: list[str]) -> None:
    """Exit 0 or 2 (1 only with 'training diverged' or 'interrupted'), never a traceback, one error line."""
    assert "Traceback" not in err, (argv, err)
    lines = err.strip().splitlines()
    if code == 0:
        return
    assert code in (1, 2), (argv, code, err)
    errors = [line for line in lines if line.startswith("mechfaith: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], (argv, err)  # (log warnings may come first)
    if code == 1:
        assert "training diverged" in errors[0] or errors[0] == "mechfaith: interrupted", (argv, err)
    else:
        assert errors[0].startswith("mechfaith: error: "), (argv, err)


def run_cli(argv: list[str], root: Path, out: Path | None = None) -> tuple[int, str, str]:
    """``mechfaith ARGV`` in-process; checks :func:`check_outcome` and that nothing under ``root`` but
    ``out`` changed. Returns (exit code, stdout, stderr)."""
    before = tree(root, out)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code: Any = main(argv)
        except SystemExit as exc:  # argparse errors, --help
            code = exc.code
    check_outcome(code, stderr.getvalue(), argv)
    event(f"exit {code}")  # (pytest --hypothesis-show-statistics shows how the cases ended)
    assert tree(root, out) == before, f"{argv}: a file outside --out changed"
    return int(code), stdout.getvalue(), stderr.getvalue()


def refused_cleanly(load: Callable[[], Any]) -> str | None:
    """Call a loader: None when it reads the input, its one-line message when it refuses it with a
    mechfaith error or an OS error (what the command line turns into one line, exit 2). Any other
    exception is a bug and propagates."""
    try:
        load()
    except (MechfaithError, OSError) as exc:
        text = str(exc)
        assert text.strip(), repr(exc)
        event("refused")
        return " ".join(text.split())
    event("read")
    return None
