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
