"""open_coder on folders whose optional fields have the wrong type (issue 15): never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechfaith.coders import CoderConfig, build_coder
from mechfaith.errors import CoderFileError
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.saelens import export_saelens

torch.set_num_threads(1)


@pytest.mark.parametrize("metadata", ["x", [1, 2], {"model_name": 5}, {"model_name": ["gpt2"]}, None])
def test_saelens_metadata_of_the_wrong_type(tmp_path: Path, metadata: object) -> None:
    coder = build_coder(CoderConfig(d_in=6, n_latents=10, d_out=4), seed=0)
    folder = export_saelens(coder, tmp_path / "sae", layer=2, input_site="mlp_in", output_site="mlp_out",
                            model_name="tiny")
    assert open_coder(folder).model == "tiny"
    cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    cfg["metadata"] = metadata
    (folder / "cfg.json").write_text(json.dumps(cfg), encoding="utf-8")
    if metadata is not None:  # a wrong type is one line naming the file and the field, not a traceback
        with pytest.raises(CoderFileError, match="cfg.json.*'(metadata|model_name)' must be") as err:
            open_coder(folder)
        assert "\n" not in str(err.value)
        return
    ref = open_coder(folder)  # null metadata: no model name, the weights as they were
    assert ref.model is None and torch.equal(ref.coder.W_enc, coder.W_enc)


# ------------------------------------------------------------------ the weights policy in every format
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# format -> (fixture folder, weights file, a 2-D tensor in it, what open_coder is given inside the copy)
FORMATS = {
    "saelens": ("saelens/standard", "sae_weights.safetensors", "W_enc", "."),
    "sparsify": ("sparsify/sae", "sae.safetensors", "encoder.weight", "."),
    "dictionary_learning": ("dictionary_learning/standard", "ae.pt", "encoder.weight", "."),
    "circuit_tracer": ("circuit_tracer/relu", "layer_0.safetensors", "W_enc", "layer_0.safetensors"),
}
DAMAGE = {
    "nan": (lambda t: t.float().fill_(float("nan")), "non-finite"),
    "inf": (lambda t: t.float().index_fill_(0, torch.tensor([0]), float("inf")), "non-finite"),
    "int32": (lambda t: t.to(torch.int32), "has dtype int32"),
    "float64 inexact": (lambda t: t.double() + 1e-12, "float32 cannot hold"),
    "float64 exact": (lambda t: t.double(), None),
}


def _damaged_copy(tmp_path: Path, fmt: str, damage: str) -> tuple[Path, Path]:
    import shutil

    from safetensors.torch import load_file, save_file

    fixture, weights, name, opened = FORMATS[fmt]
    folder = Path(shutil.copytree(FIXTURES / fixture, tmp_path / fmt))
    path = folder / weights
    tensors = torch.load(path, weights_only=True) if path.suffix == ".pt" else load_file(str(path))
    tensors[name] = DAMAGE[damage][0](tensors[name].clone())
    if path.suffix == ".pt":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path))
    return folder / opened, path


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_refuses_non_finite_integer_and_inexact_float64_weights(tmp_path: Path, fmt: str,
                                                                            damage: str) -> None:
    """NaN or infinite weights, integer weights and float64 weights float32 cannot hold are refused in one
    line naming the file (never cast or accepted silently); float64 that float32 holds exactly loads."""
    opened, weights = _damaged_copy(tmp_path, fmt, damage)
    words = DAMAGE[damage][1]
    if words is None:
        assert all(v.dtype == torch.float32 for v in open_coder(opened).coder.state_dict().values())
        return
    with pytest.raises(CoderFileError) as err:
        open_coder(opened)
    msg = str(err.value)
    assert "\n" not in msg and str(weights) in msg and words in msg, msg


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_deeply_nested_cfg_json_is_one_line(tmp_path: Path, fmt: str) -> None:
    opened, _ = _damaged_copy(tmp_path, fmt, "float64 exact")
    (opened / "cfg.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(CoderFileError, match="cfg.json: not valid JSON \\(nested deeper than 64 levels\\)"):
        open_coder(opened)
