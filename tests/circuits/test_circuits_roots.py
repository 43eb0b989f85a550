"""Parsing the root of a circuit and the features of a dashboard (mechfaith.circuits.roots)."""

from __future__ import annotations

import pytest
import torch

from mechfaith.circuits.nodes import Node
from mechfaith.circuits.roots import densest_features, feature_root, logit_root, parse_feature_list, select_features
from mechfaith.errors import ConfigError


def test_feature_root_layer_index_and_node_name():
    assert feature_root("8:355", -1, 40) == Node("feature", 39, 8, 355)
    assert feature_root(" 2 : 7 ", 5, 40) == Node("feature", 5, 2, 7)
    assert feature_root("mlp8tc[355]@37", 0, 40) == Node("feature", 37, 8, 355)  # the name's position wins
    with pytest.raises(ConfigError, match="out of range"):
        feature_root("8:355", 40, 40)
    with pytest.raises(ConfigError, match="takes a feature"):
        feature_root("attn7[7]@3", 0, 40)


def test_logit_root_top_token_and_difference():
    logits = torch.zeros(4, 10)
    logits[2, 6] = 5.0
    logits[3, 1] = 5.0
    ids = {"a": 3, "b": 4}
    assert logit_root("top", -1, logits, ids.__getitem__) == Node("logit", 3, -1, 1, -1)
    assert logit_root("top", 2, logits, ids.__getitem__) == Node("logit", 2, -1, 6, -1)
    assert logit_root("a", 0, logits, ids.__getitem__, minus="b") == Node("logit", 0, -1, 3, 4)
    with pytest.raises(ConfigError, match="out of range"):
        logit_root("top", -5, logits, ids.__getitem__)


def test_parse_feature_list():
    assert parse_feature_list("8:355, 8:top20,0:1") == [(8, "355"), (8, "top20"), (0, "1")]
    for bad in ("1-3", "8:", "8:top", "x:1", ""):
        with pytest.raises(ConfigError, match="LAYER:INDEX"):
            parse_feature_list(bad)


class _Coder:
    n_latents = 4


class _TC:
    coder = _Coder()
    layer = 1


def test_select_features_resolves_top_n(monkeypatch):
    # feature 2 fires on every non-BOS token, feature 0 on half, 1 and 3 never; BOS (position 0) is ignored
    acts = torch.zeros(2, 5, 4)
    acts[:, 1:, 2] = 1.0
    acts[:, 1:3, 0] = 1.0
    acts[:, 0, 3] = 9.0
    monkeypatch.setattr("mechfaith.circuits.roots.collect_activations", lambda model, tc, ctx, feats: acts)
    tcs = {1: _TC()}
    assert densest_features(None, tcs[1], torch.zeros(2, 5), 2) == [2, 0]
    assert select_features("1:top2,1:3", None, tcs, torch.zeros(2, 5)) == [(1, 2), (1, 0), (1, 3)]
    with pytest.raises(ConfigError, match="no transcoder for layer 0"):
        select_features("0:1", None, tcs, torch.zeros(2, 5))
