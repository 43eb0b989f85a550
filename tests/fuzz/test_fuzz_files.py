"""Generated damage to the coder files mechfaith reads (issue 15): mechfaith coder folders, SAELens folders,
legacy GPT-2 ``.pt`` files and graph JSON. Each case takes a valid input (tests/fuzz/inputs.py), damages
one file once (tests/fuzz/mutate.py) and reads it through the command that reads it, in-process (or its
loader). The promise: exit 0 (still valid) or 2 with ONE line ``mechfaith: error: ...``, never a
traceback, never a changed input file. Crashes found here were fixed in the code; each is kept as an
explicit ``@example``."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz import inputs, mutate
from tests.fuzz.helpers import fuzz_settings, refused_cleanly, run_cli, sandbox
from tests.fuzz.mutate import Damage, json_edit

torch.set_num_threads(1)
SAELENS_KINDS = ["standard", "topk", "jumprelu", "transcoder", "jumprelu_skip_transcoder", "batchtopk_inference",
                 "legacy_standard", "gated"]
CODER_COMMANDS = [["inspect"], ["inspect", "--json"], ["lm", "export"], ["lm", "import"]]


def _pop(*keys: str) -> Any:
    def edit(doc: Any) -> None:
        for k in keys[:-1]:
            doc = doc[k]
        doc.pop(keys[-1])
    return edit


# ------------------------------------------------------------------ mechfaith coder folders
@st.composite
def coder_cases(draw: st.DrawFn) -> tuple[str, Damage, list[str]]:
    base = draw(st.sampled_from(["topk", "relu"]))
    file = draw(st.sampled_from(["config.json", "weights.safetensors"]))
    damage = draw(mutate.damage_of(inputs.coder_folders()[base], file, ("config.json", "weights_sha256")))
    return base, damage, draw(st.sampled_from(CODER_COMMANDS))


@fuzz_settings(90)
@given(case=coder_cases())
# found: inspect printed the file's config dict, which may leave out fields that have defaults (KeyError)
@example(case=("topk", Damage("config.json", json_edit(_pop("config", "activation"))), ["inspect"]))
# found: inspect printed "training": null as a mapping (AttributeError)
@example(case=("topk", Damage("config.json", json_edit(lambda d: d.__setitem__("training", None))), ["inspect"]))
def test_damaged_coder_folder(case: tuple[str, Damage, list[str]]) -> None:
    """config.json (JSON damage) or weights.safetensors (bytes, header, tensors; the checksum in config.json
    updated or not), read by inspect, lm export or lm import."""
    base, damage, command = case
    with sandbox() as root:
        folder = Path(shutil.copytree(inputs.coder_folders()[base], root / "coder"))
        damage.apply(folder)
        out = root / "out"
        run_cli([*command, str(folder), *(["--out", str(out)] if command[0] == "lm" else [])], root, out)


# ------------------------------------------------------------------ SAELens folders
@st.composite
def saelens_cases(draw: st.DrawFn) -> tuple[str, Damage]:
    kind = draw(st.sampled_from(SAELENS_KINDS))
    file = draw(st.sampled_from(["cfg.json", "sae_weights.safetensors"]))
    return kind, draw(mutate.damage_of(inputs.SAELENS / kind, file))


@fuzz_settings(70)
@given(case=saelens_cases())
def test_damaged_saelens_folder(case: tuple[str, Damage]) -> None:
    kind, damage = case
    with sandbox() as root:
        folder = Path(shutil.copytree(inputs.SAELENS / kind, root / "sl"))
        damage.apply(folder)
        out = root / "out"
        run_cli(["lm", "import", str(folder), "--out", str(out)], root, out)


# ------------------------------------------------------------------ legacy GPT-2 .pt
@st.composite
def damaged_pt(draw: st.DrawFn) -> bytes:
    """The file's bytes damaged, or a torch.save of its content with the config or a tensor damaged."""
    from mechfaith.lm.safe_unpickle import safe_torch_load

    path = inputs.legacy_pt()
    if draw(st.booleans()):
        return draw(mutate.damaged_bytes(path.read_bytes()))
    obj = safe_torch_load(path)
    cfg: Any = obj["cfg"]
    state = dict(obj["state_dict"])
    if draw(st.booleans()):
        text = draw(mutate.json_text(json.loads(json.dumps(cfg, default=str))))
        try:
            cfg = json.loads(text)
        except (ValueError, RecursionError):
            cfg = text
    else:
        state = draw(mutate.damaged_tensors(state))
    buffer = io.BytesIO()
    torch.save({"cfg": cfg, "state_dict": state}, buffer)
    return buffer.getvalue()


@fuzz_settings(70)
@given(content=damaged_pt())
def test_damaged_legacy_pt(content: bytes) -> None:
    with sandbox() as root:
        path = root / inputs.legacy_pt().name
        path.write_bytes(content)
        out = root / "out"
        run_cli(["lm", "import", str(path), "--out", str(out)], root, out)


# ------------------------------------------------------------------ graph JSON
@fuzz_settings(50)
@given(text=st.deferred(lambda: mutate.json_text(json.loads(inputs.graph_json().read_text()))))
def test_damaged_graph_json(text: str) -> None:
    from mechfaith.circuits.graph_json import read_graph_json

    with sandbox() as root:
        path = root / "graph.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        refused_cleanly(lambda: read_graph_json(path))


# ------------------------------------------------------------------ set folders (lm train --layers)
@st.composite
def set_cases(draw: st.DrawFn, folder: Path) -> tuple[Damage, list[str]]:
    file = draw(st.sampled_from(["set.json", "set.json", "layers/L0/coder/config.json", "layers/L1/train.json"]))
    command = draw(st.sampled_from([["inspect"], ["inspect", "--json"], ["lm", "export"]]))
    return draw(mutate.damage_of(folder, file)), command


def test_damaged_set_folder(tiny_set: Path) -> None:
    """set.json (or a layer's files) damaged, read by inspect SET and lm export SET."""
    import shutil as sh

    @fuzz_settings(40)
    @given(case=set_cases(tiny_set))
    def check(case: tuple[Damage, list[str]]) -> None:
        damage, command = case
        with sandbox() as root:
            folder = Path(sh.copytree(tiny_set, root / "set", ignore=sh.ignore_patterns("activations", "checkpoint")))
            damage.apply(folder)
            out = root / "out"
            run_cli([*command, str(folder), *(["--out", str(out)] if command[0] == "lm" else [])], root, out)

    check()
