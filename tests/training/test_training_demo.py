"""The demo task of ``mechfaith train`` (mechfaith.training.demo): reference MLP and input stream."""

from __future__ import annotations

import pytest
import torch

from mechfaith.errors import ConfigError
from mechfaith.training.demo import TASK_NAME, demo_inputs, demo_reference, demo_stream


def test_reference_is_fixed_frozen_and_shaped():
    a, b = demo_reference(6, 3), demo_reference(6, 3)
    x = torch.randn(5, 6)
    assert a(x).shape == (5, 3)
    torch.testing.assert_close(a(x), b(x))  # the same seed gives the same MLP
    assert not torch.allclose(demo_reference(6, 3, seed=1)(x), a(x))
    assert not any(p.requires_grad for p in a.parameters())
    assert [type(m).__name__ for m in a] == ["Linear", "GELU", "Linear"] and a[0].out_features == 24


def test_inputs_have_the_requested_density():
    x = demo_inputs(torch.Generator().manual_seed(0), 4000, 10, 0.2)
    assert x.shape == (4000, 10)
    assert abs(float((x != 0).float().mean()) - 0.2) < 0.01


def test_stream_is_deterministic_resumable_and_yields_no_target():
    s1, s2 = demo_stream(8, 0.5, 16, seed=3), demo_stream(8, 0.5, 16, seed=3)
    x1, y1 = s1.next_batch()
    state = s1.state_dict()
    x1b, _ = s1.next_batch()
    x2, _ = s2.next_batch()
    assert y1 is None and x1.shape == (16, 8)
    torch.testing.assert_close(x1, x2)
    s2.load_state_dict(state)
    torch.testing.assert_close(s2.next_batch()[0], x1b)
    assert TASK_NAME == "demo-gelu-mlp"
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="density"):
            demo_stream(8, bad, 16, seed=0)
