"""Damaged and hostile legacy GPT-2 transcoder ``.pt`` files (issue 15): each is refused with one
CoderFileError line naming the file, never a traceback, and refusing one takes memory bounded by
its size (checked in a subprocess: at most 2x the file's size plus 64 MB)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import mechfaith
from mechfaith.errors import CoderFileError, MechfaithError
from mechfaith.lm.gpt2_transcoders import import_gpt2_transcoder
from mechfaith.lm.safe_unpickle import safe_torch_load
from tests.lm.test_lm_formats import LEGACY_NAME, write_legacy

MB = 1 << 20


def refused(path: Path, *words: str) -> str:
    with pytest.raises(CoderFileError) as exc:
        import_gpt2_transcoder(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    path = tmp_path / LEGACY_NAME
    write_legacy(path)
    return path


def entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def rezip(path: Path, items: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in items.items():
            z.writestr(name, data)
    return path


def with_pickle(path: Path, payload: bytes) -> Path:
    """A torch.save archive whose data.pkl is ``payload``."""
    torch.save({"a": torch.zeros(2)}, path)
    items = entries(path)
    items[next(n for n in items if n.endswith("/data.pkl"))] = payload
    return rezip(path, items)


def patch_central(path: Path, edit) -> Path:
    """Apply ``edit(bytearray, offset)`` to every central-directory record of the archive."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at != -1:
        edit(data, at)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- zip damage
def test_legacy_bad_crc_is_one_line(legacy: Path) -> None:
    data = bytearray(legacy.read_bytes())
    with zipfile.ZipFile(legacy) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= 0x55  # a byte of W_enc's storage
    legacy.write_bytes(bytes(data))
    refused(legacy, "damaged zip archive", "CRC")


def test_legacy_encrypted_flag_is_one_line(legacy: Path) -> None:
    patch_central(legacy, lambda d, at: d.__setitem__(at + 8, d[at + 8] | 1))
    refused(legacy, "encrypted")


def test_legacy_unknown_compression_is_one_line(legacy: Path) -> None:
    patch_central(legacy, lambda d, at: d.__setitem__(slice(at + 10, at + 12), struct.pack("<H", 99)))
    refused(legacy, "compressed (method 99)")


def test_legacy_zip_bomb_is_refused_unread(legacy: Path) -> None:
    items = entries(legacy)
    items[next(n for n in items if n.endswith("/data/0"))] = bytes(256 * MB)  # deflates to ~250 kB
    rezip(legacy, items, zipfile.ZIP_DEFLATED)
    assert legacy.stat().st_size < 2 * MB
    refused(legacy, "compressed (method 8)", "uncompressed")


def test_legacy_entry_larger_than_the_file_is_refused(legacy: Path) -> None:
    def grow(d: bytearray, at: int) -> None:
        d[at + 20:at + 28] = struct.pack("<II", 1 << 30, 1 << 30)  # compressed and uncompressed size

    patch_central(legacy, grow)
    refused(legacy, "declares 1073741824 bytes")


def many_entries(path: Path, legacy: Path, n: int = 60_000) -> Path:
    """The legacy archive plus ``n`` empty entries: a directory of ~3 MB (zipfile would build ~35 MB
    of objects from it)."""
    items = entries(legacy)
    prefix = next(iter(items)).split("/")[0]
    items.update({f"{prefix}/x/{i:x}": b"" for i in range(n)})
    return rezip(path, items)


def test_legacy_zip_with_a_huge_directory_is_refused_unread(tmp_path: Path, legacy: Path) -> None:
    refused(many_entries(tmp_path / "many.pt", legacy), "the zip's directory declares", "refused unread")


# ---------------------------------------------------------------- pickle damage
def test_legacy_self_referencing_pickle(tmp_path: Path) -> None:
    loop: list = []
    loop.append(loop)
    refused(with_pickle(tmp_path / "a.pt", pickle.dumps({"cfg": loop, "state_dict": {}}, protocol=2)),
            "contains itself")
    d: dict = {}
    d["state_dict"] = d
    refused(with_pickle(tmp_path / "b.pt", pickle.dumps(d, protocol=2)), "contains itself")


def test_legacy_deep_pickle(tmp_path: Path) -> None:
    deep = b"\x80\x02" + b"(" * 200_000 + b"l" * 200_000 + b"."  # lists nested 200,000 deep
    refused(with_pickle(tmp_path / "a.pt", deep), "the pickle is 400003 bytes")
    deep = b"\x80\x02" + b"(" * 50_000 + b"l" * 50_000 + b"."  # small enough to be read
    refused(with_pickle(tmp_path / "b.pt", deep), "deeper than 64 levels")


def test_legacy_pickle_that_expands(tmp_path: Path) -> None:
    shared: list = [1]
    for _ in range(40):
        shared = [shared, shared]  # 2^40 paths through a 40-node pickle
    refused(with_pickle(tmp_path / "a.pt", pickle.dumps({"cfg": shared}, protocol=2)), "more than 100000 objects")


def test_legacy_pickle_declaring_huge_lengths(tmp_path: Path) -> None:
    huge_bytes = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"x" * 10 + b"."  # BINBYTES8 of 1 TB
    refused(with_pickle(tmp_path / "a.pt", huge_bytes), "unreadable pickle")
    huge_memo = b"\x80\x02]r" + struct.pack("<I", 1 << 31) + b"."  # LONG_BINPUT at index 2^31
    refused(with_pickle(tmp_path / "b.pt", huge_memo), "memo index")


# ---------------------------------------------------------------- tensors
def test_legacy_stride_zero_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stride0.pt"
    torch.save({"cfg": {}, "state_dict": {"W_enc": torch.zeros(1).expand(8192, 8192)}}, path)
    assert path.stat().st_size < 8 * 1024
    refused(path, "larger than its storage")


def test_legacy_many_views_of_one_storage_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "views.pt"
    t = torch.zeros(256 * 1024)  # 1 MB, saved once, rebuilt 500 times
    torch.save({"cfg": {}, "state_dict": {f"w{i}": t[:] for i in range(500)}}, path)
    refused(path, "more than the file holds")


def test_legacy_storage_of_the_wrong_size(legacy: Path) -> None:
    items = entries(legacy)
    key = next(n for n in items if n.endswith("/data/0"))
    items[key] = items[key][:-4]
    refused(rezip(legacy, items), "storage 0 holds")


def replace_tensor(path: Path, name: str, value: torch.Tensor) -> None:
    obj = safe_torch_load(path)
    sd = OrderedDict((k, v) for k, v in obj["state_dict"].items())
    sd[name] = value
    torch.save({"cfg": {"hook_point": "blocks.5.ln2.hook_normalized"}, "state_dict": sd}, path)


@pytest.mark.parametrize("name,value,words", [
    ("W_enc", torch.zeros(16 * 40), ("W_enc has 1 dimension", "expected 2")),
    ("b_enc", torch.zeros(40, 1), ("b_enc has 2 dimension", "expected 1")),
    ("W_dec", torch.zeros(40, 16, 1), ("W_dec has 3 dimension",)),
    ("b_dec_out", torch.zeros(15), ("b_dec_out has shape (15,)", "expected (16,)")),
    ("W_enc", torch.zeros(16, 40, dtype=torch.int32), ("dtype int32", "floating point")),
    ("W_enc", torch.full((16, 40), float("nan")), ("W_enc holds 640 non-finite", "640 NaN")),
    ("b_dec", torch.tensor([float("inf")] + [0.0] * 15), ("b_dec holds 1 non-finite",)),
    ("W_dec", torch.full((40, 16), 0.1, dtype=torch.float64), ("float64", "float32 cannot hold")),
])
def test_legacy_bad_tensors(legacy: Path, name: str, value: torch.Tensor, words: tuple[str, ...]) -> None:
    replace_tensor(legacy, name, value)
    refused(legacy, *words)


def test_legacy_float64_that_float32_holds_is_accepted(legacy: Path) -> None:
    want = safe_torch_load(legacy)["state_dict"]["W_dec"]
    replace_tensor(legacy, "W_dec", want.double())
    assert torch.equal(import_gpt2_transcoder(legacy).coder.W_dec, want)


# ---------------------------------------------------------------- memory
_MEASURE = """
import json, resource, sys, tracemalloc
from mechfaith.errors import MechfaithError
from mechfaith.lm.gpt2_transcoders import import_gpt2_transcoder
import_gpt2_transcoder(sys.argv[1])  # warm up: every lazy import done
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tracemalloc.start()
out = {}
for path in sys.argv[2:]:
    tracemalloc.reset_peak()
    try:
        import_gpt2_transcoder(path)
        out[path] = "accepted"
        continue
    except MechfaithError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    out[path] = [tracemalloc.get_traced_memory()[1], rss]
print(json.dumps(out))
"""


def test_refusing_a_legacy_pt_takes_memory_bounded_by_its_size(tmp_path: Path, legacy: Path) -> None:
    stride0 = tmp_path / "stride0.pt"
    torch.save({"cfg": {}, "state_dict": {"W_enc": torch.zeros(1).expand(8192, 8192)}}, stride0)
    views = tmp_path / "views.pt"
    t = torch.zeros(256 * 1024)
    torch.save({"cfg": {}, "state_dict": {f"w{i}": t[:] for i in range(500)}}, views)
    bomb = tmp_path / "bomb.pt"
    items = entries(legacy)
    items[next(n for n in items if n.endswith("/data/0"))] = bytes(512 * MB)
    rezip(bomb, items, zipfile.ZIP_DEFLATED)
    huge_bytes = with_pickle(tmp_path / "bytes8.pt", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 33) + b"x" + b".")
    huge_memo = with_pickle(tmp_path / "memo.pt", b"\x80\x02]r" + struct.pack("<I", 1 << 31) + b".")
    shared: list = [1]
    for _ in range(40):
        shared = [shared, shared]
    laughs = with_pickle(tmp_path / "laughs.pt", pickle.dumps({"cfg": shared}, protocol=2))
    deep = with_pickle(tmp_path / "deep.pt", b"\x80\x02" + b"(" * 50_000 + b"l" * 50_000 + b".")
    many = many_entries(tmp_path / "many.pt", legacy)
    hostile = [stride0, views, bomb, huge_bytes, huge_memo, laughs, deep, many]
    env = {**os.environ, "PYTHONPATH": str(Path(mechfaith.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(legacy), *map(str, hostile)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    for path in hostile:
        bound = 2 * path.stat().st_size + 64 * MB
        assert result[str(path)] != "accepted", path
        traced, rss = result[str(path)]
        assert traced < bound and rss < bound, (path.name, traced, rss, bound)


def test_refusal_is_a_mechfaith_error_for_every_truncation(legacy: Path) -> None:
    """Cut anywhere, the file is refused in one line (never another exception)."""
    data = legacy.read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 40)):
        legacy.write_bytes(data[:cut])
        with pytest.raises(MechfaithError):
            import_gpt2_transcoder(legacy)



def test_lm_import_reports_a_hostile_pt_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mechfaith.cli.main import main

    path = tmp_path / "stride0.pt"
    torch.save({"cfg": {}, "state_dict": {"W_enc": torch.zeros(1).expand(8192, 8192)}}, path)
    assert main(["lm", "import", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mechfaith: error: ") and "larger than its storage" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stride0.pt"]  # nothing written
