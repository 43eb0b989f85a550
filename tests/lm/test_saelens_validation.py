"""Damaged SAELens folders (copies of the fixtures SAELens wrote, then broken one way each) are refused
in one line naming the file, never a traceback and never a silently changed computation (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mechfaith.errors import CoderFileError
from mechfaith.lm.saelens import import_saelens
from tests.lm.fixture_copies import edited_copy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "saelens"


def _copy(tmp_path: Path, name: str, change=None, tensors=None) -> Path:
    return edited_copy(FIXTURES / name, tmp_path / name, "sae_weights.safetensors", change, tensors)


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.update(k="abc"), "'k' must be"),
    (lambda c: c.update(k=None, architecture=["topk"]), "'architecture' must be"),
    (lambda c: c["metadata"].update(hook_name=5), "'hook_name' must be"),
    (lambda c: c.update(metadata="x"), "'metadata' must be"),
    (lambda c: c.update(d_in="16"), "'d_in' must be"),
])
def test_wrong_types_in_cfg_are_one_line(tmp_path, change, problem):
    folder = _copy(tmp_path, "topk", change)
    with pytest.raises(CoderFileError, match=problem) as err:
        import_saelens(folder)
    assert "\n" not in str(err.value) and "cfg.json" in str(err.value)


def test_negative_jumprelu_threshold_is_refused_not_clamped(tmp_path):
    def negative(t):
        t["threshold"] = t["threshold"].clone()
        t["threshold"][3] = -0.5
    folder = _copy(tmp_path, "jumprelu", tensors=negative)
    with pytest.raises(CoderFileError, match="threshold holds values below 0"):
        import_saelens(folder)


def test_rank_one_encoder_is_refused(tmp_path):
    folder = _copy(tmp_path, "standard", tensors=lambda t: t.update(W_enc=t["W_enc"].reshape(-1).contiguous()))
    with pytest.raises(CoderFileError, match="2-D|dimension"):
        import_saelens(folder)


def test_the_unbroken_fixture_still_reads(tmp_path):
    imp = import_saelens(_copy(tmp_path, "jumprelu"))
    assert imp.coder.cfg.activation == "jumprelu" and bool((imp.coder.threshold() > 0).all())
    assert torch.isfinite(imp.coder.W_enc).all()
