"""A command stopped from outside (issue 15): Ctrl-C in the first seconds, while torch is still being
imported, is one line ``mechfaith: interrupted`` (exit 1), never a traceback; a command killed outright
(SIGKILL, which nothing can catch) during ``--overwrite`` leaves the user's folder as it was, and the next
command writing that ``--out`` removes the temporary it left, or puts back an old folder it had moved aside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import mechfaith
from mechfaith import atomic
from mechfaith.cli.main import main
from mechfaith.cli.out_guard import new_output
from mechfaith.errors import ConfigError

TINY = ["--quiet", "--d-in", "4", "--n-latents", "8", "--k", "2", "--batch-size", "16", "--log-every", "1"]


def _mechfaith(*argv: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(mechfaith.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mechfaith", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def _wait_for(what: str, ready: Any, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"never saw {what} (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.005)


def _tree(root: Path) -> dict[str, Any]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _user_folder(tmp_path: Path) -> Path:
    crowded = tmp_path / "crowded"
    (crowded / "sub").mkdir(parents=True)
    (crowded / "thesis.tex").write_text("mine")
    (crowded / "sub" / "data.csv").write_text("1,2\n")
    return crowded


def test_ctrl_c_while_torch_is_imported_is_one_line(tmp_path: Path) -> None:
    proc = _mechfaith("train", "--out", str(tmp_path / "run"), *TINY, cwd=tmp_path)
    maps = Path(f"/proc/{proc.pid}/maps")

    def importing_torch() -> bool:
        try:
            return "libtorch" in maps.read_text()
        except OSError:
            return False

    if not maps.parent.exists():
        proc.kill()
        proc.communicate()
        pytest.skip("no /proc to see when torch is being imported")
    _wait_for("torch being imported", importing_torch, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (1, "mechfaith: interrupted\n"), (out, err)
    assert not (tmp_path / "run").exists()


def test_sigkill_during_overwrite_leaves_the_old_folder_and_the_next_run_cleans_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    crowded = _user_folder(tmp_path)
    before = _tree(crowded)
    proc = _mechfaith("train", "--out", str(crowded), "--overwrite", "--n-steps", "1000000", *TINY, cwd=tmp_path)

    def training() -> bool:  # the run writes its log in its temporary folder
        return any((t / "train.jsonl").is_file() for t in tmp_path.glob(".crowded.*.tmp"))

    _wait_for("training in the temporary folder", training, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _tree(crowded) == before  # untouched
    assert [p.name for p in tmp_path.glob(".crowded.*.tmp")]  # what SIGKILL leaves: nothing can remove it then

    monkeypatch.setattr(atomic, "STARTED", time.time())  # the next command is a new process
    small = ["train", "--out", str(crowded), "--n-steps", "2", *TINY]
    assert main(small) == 2  # still the user's folder: refused, temporary or not
    assert "--overwrite" in capsys.readouterr().err
    assert main([*small, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crowded"]  # the killed run's temporary is gone
    assert (crowded / "coder").is_dir() and not (crowded / "thesis.tex").exists()


def _killed_between_the_renames(crowded: Path) -> None:
    """What a process killed between atomic_dir's two renames leaves: the old folder moved aside to
    ``.crowded.old``, the complete new result still in its temporary, nothing at ``crowded``."""
    old = crowded.with_name(".crowded.old")
    crowded.rename(old)
    new = crowded.with_name(".crowded.ab12cd34.tmp")
    (new / "coder").mkdir(parents=True)
    (new / "train.json").write_text("{}")
    past = time.time() - 3600
    for p in (new, new / "coder", new / "train.json"):
        os.utime(p, (past, past))


def test_a_kill_between_the_renames_puts_the_old_folder_back(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    crowded = _user_folder(tmp_path)
    before = _tree(crowded)
    _killed_between_the_renames(crowded)
    small = ["train", "--out", str(crowded), "--n-steps", "2", *TINY]
    assert main(small) == 2  # the old folder is back, and it is the user's: refused, not written
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mechfaith: error: ") and "--overwrite" in err[0], err
    assert _tree(crowded) == before
    assert main([*small, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crowded"]  # no .old, no temporary
    assert (crowded / "coder").is_dir() and not (crowded / "thesis.tex").exists()


def test_a_finish_at_end_write_after_such_a_kill_keeps_the_old_folder(tmp_path: Path) -> None:
    crowded = _user_folder(tmp_path)
    before = _tree(crowded)
    _killed_between_the_renames(crowded)
    with pytest.raises(ConfigError, match="--overwrite"):
        with new_output(crowded, ("coder", "train.json"), "demo run"):
            pytest.fail("a folder of the user's was about to be replaced")
    assert _tree(crowded) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".crowded.ab12cd34.tmp", "crowded"]
    with atomic.atomic_dir(crowded) as tmp:  # (the user gave --overwrite)
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crowded"]
    assert [p.name for p in crowded.iterdir()] == ["new.txt"]


def test_a_run_into_a_new_folder_removes_what_a_killed_overwrite_left(tmp_path: Path) -> None:
    left = tmp_path / ".run.ab12cd34.tmp"  # an earlier `train --out run --overwrite`, killed outright
    (left / "checkpoint").mkdir(parents=True)
    (left / "train.jsonl").write_text("{}\n")
    past = time.time() - 3600
    for p in (left / "checkpoint", left / "train.jsonl", left):
        os.utime(p, (past, past))
    assert main(["train", "--out", str(tmp_path / "run"), "--n-steps", "2", *TINY]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
