"""Fixtures of the activation tests: ``lm``, a tiny random Llama (3 layers), and ``contexts``, 12
BOS-prefixed contexts of 9 random tokens (module-scoped, read only; a test module that defines its
own ``lm`` fixture overrides this one)."""

import pytest
import torch


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("transformers")
    from mechfaith.lm.models import random_model

    return random_model("llama", n_layers=3, seed=2)


@pytest.fixture(scope="module")
def contexts():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(2, 100, (12, 9), generator=g)
    c[:, 0] = 0
    return c
