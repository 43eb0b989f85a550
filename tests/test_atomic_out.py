"""The pieces of output safety in :mod:`mechfaith.atomic`: what counts as a command's own folder,
replacing a file or a link whole, the final names of paths written in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mechfaith.atomic import atomic_dir, atomic_path, check_file_replaceable, check_replaceable, final_path
from mechfaith.errors import ConfigError


def test_own_names_are_patterns_and_their_leftover_temporaries(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("train.json", "fig_a.png", ".checkpoint.ab12cd34.tmp", ".coder.old", ".train.json.zz99yy88.tmp"):
        (run / name).write_text("x")
    check_replaceable(run, ("train.json", "*.png", "checkpoint", "coder"), "run")  # all of them its own
    (run / ".checkpoint.notatemp").write_text("x")
    with pytest.raises(ConfigError, match=r"not an empty folder .*\.checkpoint\.notatemp.*--overwrite"):
        check_replaceable(run, ("train.json", "*.png", "checkpoint", "coder"), "run")
    check_replaceable(run, (), "run", overwrite=True)


def test_files_links_and_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "link")
    for name, kind in (("f", "a file"), ("link", "a link")):
        with pytest.raises(ConfigError, match=f"is {kind}, not an empty folder"):
            check_replaceable(tmp_path / name, (), "run")
        check_replaceable(tmp_path / name, (), "run", overwrite=True)
    monkeypatch.chdir(tmp_path / "d")
    for out in (".", str(tmp_path)):
        with pytest.raises(ConfigError, match="current folder"):
            check_replaceable(out, (), "run", overwrite=True)


def test_atomic_dir_replaces_a_file_or_a_link_itself(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("old")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "a.txt").write_text("kept")
    os.symlink(keep, tmp_path / "link")
    for name in ("f", "link"):
        with atomic_dir(tmp_path / name) as tmp:
            (tmp / "new.txt").write_text("new")
        assert (tmp_path / name).is_dir() and not (tmp_path / name).is_symlink()
        assert [p.name for p in (tmp_path / name).iterdir()] == ["new.txt"]
    assert (keep / "a.txt").read_text() == "kept"  # what the link pointed to is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "keep", "link"]


def test_a_failed_block_leaves_the_old_entry(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "f") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("stopped")
    assert (tmp_path / "f").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_failed_write_leaves_no_new_parent_folders(tmp_path: Path) -> None:
    for writer in (atomic_dir, atomic_path):
        with pytest.raises(RuntimeError), writer(tmp_path / "a" / "b" / "out"):
            raise RuntimeError("stopped")
        assert list(tmp_path.iterdir()) == []
    with atomic_path(tmp_path / "a" / "b" / "f.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "a" / "b" / "f.txt").read_text() == "x"


def test_final_path_maps_nested_temporaries(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert final_path(out / "x") == out / "x"
    with atomic_dir(out) as tmp:
        assert final_path(tmp / "coder" / "config.json") == out / "coder" / "config.json"
        with atomic_dir(tmp / "inner") as tmp2:
            assert final_path(tmp2 / "a") == out / "inner" / "a"
        assert final_path(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert final_path(tmp) == tmp  # the block is over


def test_a_json_out(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        check_file_replaceable(tmp_path / "d", lambda p: True, overwrite=True)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a file this command wrote.*--overwrite"):
        check_file_replaceable(tmp_path / "r.json", lambda p: False)
    check_file_replaceable(tmp_path / "r.json", lambda p: True)
    check_file_replaceable(tmp_path / "r.json", lambda p: False, overwrite=True)
    check_file_replaceable(tmp_path / "new.json", lambda p: False)
