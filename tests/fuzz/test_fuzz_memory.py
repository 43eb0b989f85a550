"""Bounded memory on generated damage (issue 15): the loaders of legacy ``.pt`` files, coder folders,
SAELens folders, activation caches and checkpoints read damaged files (declared shapes and sizes far
beyond the file, bytes cut or flipped, tensors of another dtype) in a subprocess under an address-space
limit; the peak resident memory they add stays under 2x the largest file plus 64 MB, and each file is
read or refused with a mechfaith error (never another exception, MemoryError included)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mechfaith
from tests.fuzz import inputs, mutate
from tests.fuzz.helpers import fuzz_settings
from tests.fuzz.mutate import Damage
from tests.fuzz.test_fuzz_files import damaged_pt

pytest.importorskip("transformers")
MB = 1 << 20

_MEASURE = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from mechfaith.errors import MechfaithError
from mechfaith.coders.files import load_coder
from mechfaith.lm.activation_cache import ActivationCache
from mechfaith.lm.gpt2_transcoders import import_gpt2_transcoder
from mechfaith.lm.saelens import import_saelens
from mechfaith.training.checkpoint import load_checkpoint

def read_cache(path):
    cache = ActivationCache(path)
    for layer in cache.layers:
        cache.load(layer)

LOAD = {"pt": import_gpt2_transcoder, "coder": load_coder, "saelens": import_saelens, "cache": read_cache,
        "checkpoint": load_checkpoint}
with open(sys.argv[1]) as fh:
    cases, warm = json.load(fh)
for kind, path in warm.items():  # every lazy import done before measuring
    LOAD[kind](path)
with open("/proc/self/status") as fh:
    vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # a blow-up fails, not the machine
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {}
for kind, path in cases:
    try:
        LOAD[kind](path)
        result = "read"
    except MechfaithError:
        result = "refused"
    except OSError as exc:
        result = "refused" if exc.errno is not None else f"crash: {type(exc).__name__}: {exc}"
    except BaseException as exc:
        result = f"crash: {type(exc).__name__}: {str(exc)[:200]}"
    out[path] = [result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base]
print(json.dumps(out))
"""

# kind -> (the valid input's folder, the file damaged in it, its checksum record), for folder formats
FOLDERS = {
    "coder": (lambda: inputs.coder_folders()["topk"], "weights.safetensors", ("config.json", "weights_sha256")),
    "saelens": (lambda: inputs.SAELENS / "jumprelu", "sae_weights.safetensors", None),
    "cache": (lambda: inputs.activation_cache(), "layer_01/shard_00000.safetensors",
              ("index.json", "shards/1/0/sha256")),
    "checkpoint": (lambda: inputs.demo_run() / "checkpoint", "state.safetensors",
                   ("trainer_state.json", "state_sha256")),
}


@st.composite
def memory_cases(draw: st.DrawFn) -> tuple[str, bytes | Damage]:
    """A damaged legacy .pt, or a damaged safetensors file of a folder format (header shapes and offsets,
    bytes, tensors; checksum kept consistent or not)."""
    kind = draw(st.sampled_from(["pt", "pt", "coder", "saelens", "cache", "checkpoint"]))
    if kind == "pt":
        return kind, draw(damaged_pt())
    folder, file, checksum = FOLDERS[kind]
    return kind, draw(mutate.damage_of(folder(), file, checksum))


def test_loaders_take_memory_bounded_by_the_file_size(tmp_path: Path) -> None:
    cases: list[tuple[str, str]] = []
    sizes: dict[str, int] = {}

    @fuzz_settings(60)
    @given(case=memory_cases())
    def write(case: tuple[str, bytes | Damage]) -> None:
        kind, damage = case
        where = tmp_path / f"case{len(cases)}"
        if isinstance(damage, bytes):
            where.mkdir()
            path = where / inputs.legacy_pt().name
            path.write_bytes(damage)
        else:
            path = Path(shutil.copytree(FOLDERS[kind][0](), where))
            damage.apply(path)
        cases.append((kind, str(path)))
        sizes[str(path)] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
            else path.stat().st_size

    write()
    warm = {"pt": str(inputs.legacy_pt()), "coder": str(inputs.coder_folders()["topk"]),
            "saelens": str(inputs.SAELENS / "jumprelu"), "cache": str(inputs.activation_cache()),
            "checkpoint": str(inputs.demo_run() / "checkpoint")}
    env = {**os.environ, "PYTHONPATH": str(Path(mechfaith.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    (tmp_path / "cases.json").write_text(json.dumps([cases, warm]))
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "cases.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    crashes = {path: r for path, (r, _) in result.items() if r.startswith("crash")}
    assert not crashes, crashes
    bound = 2 * max(sizes.values()) + 64 * MB
    peak = max(rss for _, rss in result.values())
    assert peak < bound, (peak, bound, max(result.items(), key=lambda item: item[1][1]))
