"""Generated damage to the files a run reads back (issue 15): activation caches (``index.json`` and the
shards) and checkpoints (``trainer_state.json``, its tensor files and its coder), read by their loaders
and by ``lm train --activations`` and ``train --resume`` in-process. Exit 0, 2 (one line) or, for a
resumed run whose damaged state makes the loss non-finite, 1 with "training diverged"; never a
traceback, never a changed file outside the run folder. Crashes found here were fixed in the code; each
is kept as an explicit ``@example``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz import inputs, mutate
from tests.fuzz.helpers import fuzz_settings, refused_cleanly, run_cli, sandbox
from tests.fuzz.mutate import Damage, json_edit, tensors_edit

pytest.importorskip("transformers")
torch.set_num_threads(1)


# ------------------------------------------------------------------ activation caches
@st.composite
def cache_cases(draw: st.DrawFn, layers: tuple[str, ...] = ("0", "1")) -> Damage:
    folder = inputs.activation_cache()
    if draw(st.booleans()):
        return draw(mutate.damage_of(folder, "index.json"))
    index = json.loads((folder / "index.json").read_text())
    shards = [(layer, i, info["file"]) for layer in layers for i, info in enumerate(index["shards"][layer])]
    layer, i, file = draw(st.sampled_from(shards))
    return draw(mutate.damage_of(folder, file, ("index.json", f"shards/{layer}/{i}/sha256")))


def _read_cache(folder: Path) -> None:
    """Everything a run does with a cache: the index, every shard, a few batches of the stream, the checksums."""
    from mechfaith.lm.activation_cache import ActivationCache

    cache = ActivationCache(folder)
    for layer in cache.layers:
        cache.load(layer)
        stream = cache.stream(layer, batch_size=8, seed=1)
        for _ in range(3):
            stream.next_batch()
    cache.verify()


@fuzz_settings(50)
@given(damage=cache_cases())
# found: a layer listed with no shards (load: torch.cat of nothing, ValueError; read_shard: IndexError)
@example(damage=Damage("index.json", json_edit(lambda d: d["shards"].__setitem__("0", []))))
def test_damaged_activation_cache(damage: Damage) -> None:
    with sandbox() as root:
        folder = Path(shutil.copytree(inputs.activation_cache(), root / "acts"))
        damage.apply(folder)
        refused_cleanly(lambda: _read_cache(folder))


@fuzz_settings(25)
@given(damage=cache_cases(layers=("1",)))
# found: "extra": null in index.json (AttributeError in LayerData.from_cache)
@example(damage=Damage("index.json", json_edit(lambda d: d.__setitem__("extra", None))))
# found: constant rows (a zeroed shard) made the least-squares skip's Gram matrix singular (LinAlgError)
@example(damage=Damage("layer_01/shard_00000.safetensors", tensors_edit(lambda t: t["x"].zero_()),
                       ("index.json", "shards/1/0/sha256")))
def test_lm_train_from_a_damaged_cache(damage: Damage) -> None:
    """``lm train --activations`` on a damaged cache (a few steps of a tiny transcoder when it is still valid)."""
    with sandbox() as root:
        folder = Path(shutil.copytree(inputs.activation_cache(), root / "acts"))
        damage.apply(folder)
        out = root / "run"
        run_cli(["lm", "train", "--activations", str(folder), "--out", str(out), "--model", "random-gpt2",
                 "--layer", "1", "--corpus-source", str(inputs.texts()), "--corpus-context-length", "16",
                 "--n-steps", "2", "--batch-size", "16", "--expansion", "1", "--k", "2", "--log-every", "1",
                 "--quiet"], root, out)


# ------------------------------------------------------------------ checkpoints
CHECKSUMS = {"optimizer.safetensors": ("trainer_state.json", "optimizer_sha256"),
             "state.safetensors": ("trainer_state.json", "state_sha256"),
             "coder/weights.safetensors": ("coder/config.json", "weights_sha256")}


@st.composite
def checkpoint_cases(draw: st.DrawFn) -> Damage:
    file = draw(st.sampled_from(["trainer_state.json", "optimizer.safetensors", "state.safetensors",
                                 "coder/config.json", "coder/weights.safetensors"]))
    return draw(mutate.damage_of(inputs.demo_run() / "checkpoint", file, CHECKSUMS.get(file)))


@fuzz_settings(45)
@given(damage=checkpoint_cases())
def test_resume_from_a_damaged_checkpoint(damage: Damage) -> None:
    """A damaged checkpoint (checksums updated or not), then ``train --resume`` to step 6; a file beside the
    run folder stays as it was."""
    with sandbox() as root:
        run = Path(shutil.copytree(inputs.demo_run(), root / "run"))
        (root / "notes.txt").write_text("the user's")
        damage.apply(run / "checkpoint")
        run_cli(["train", "--out", str(run), "--n-steps", "6", "--resume", *inputs.DEMO], root, run)
