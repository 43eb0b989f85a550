"""Where a circuit or a dashboard starts: parsing root features, root logits and feature lists.

- :func:`feature_root`: ``"8:355"`` (layer:index, at a given position) or a node name
  ``"mlp8tc[355]@37"``; negative positions count from the end of the prompt.
- :func:`logit_root`: a token id, a one-token text or ``"top"`` (the model's top prediction at the
  position), optionally minus another token's logit (a logit difference).
- :func:`parse_feature_list` / :func:`select_features`: ``"8:355,8:top20"`` for dashboards, where
  ``topN`` means the N densest features of that layer on the given contexts.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch import Tensor

from mechfaith.circuits.dashboard_data import collect_activations
from mechfaith.circuits.nodes import Node, parse_node
from mechfaith.circuits.replacement import Transcoder
from mechfaith.circuits.session import resolve_pos
from mechfaith.errors import ConfigError

_LAYER_INDEX = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_LAYER_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d+|top\d+)\s*$")


def feature_root(spec: str, position: int, seq_len: int) -> Node:
    """The root feature ``spec`` (``LAYER:INDEX`` at ``position``, or ``mlp8tc[355]@37``) on a prompt of
    ``seq_len`` tokens; a position out of range or a node that is not a feature is a ConfigError."""
    m = _LAYER_INDEX.match(spec)
    if m:
        return Node("feature", resolve_pos(position, seq_len), int(m[1]), int(m[2]))
    node = parse_node(spec)
    if node.kind != "feature":
        raise ConfigError(f"--feature takes a feature (mlp8tc[355]@37), not {spec!r}")
    return Node("feature", resolve_pos(node.pos, seq_len), node.layer, node.index)


def logit_root(spec: str, position: int, logits: Tensor, token_id: Callable[[str], int],
               minus: str | None = None) -> Node:
    """The root logit: ``spec`` is a token (id or one-token text, read by ``token_id``) or ``"top"``,
    the argmax of ``logits`` [seq, vocab] at ``position``; ``minus`` subtracts another token's logit."""
    pos = resolve_pos(position, int(logits.shape[0]))
    tok = int(logits[pos].argmax()) if spec == "top" else token_id(spec)
    return Node("logit", pos, -1, tok, token_id(minus) if minus is not None else -1)


def parse_feature_list(text: str) -> list[tuple[int, str]]:
    """``"8:355,8:top20"`` -> ``[(8, "355"), (8, "top20")]``; anything else is a ConfigError."""
    items = []
    for part in text.split(","):
        m = _LAYER_SPEC.match(part)
        if not m:
            raise ConfigError(f"cannot read feature {part!r}; expected LAYER:INDEX or LAYER:topN")
        items.append((int(m[1]), m[2]))
    return items


def densest_features(model: torch.nn.Module, tc: Transcoder, contexts: Tensor, n: int) -> list[int]:
    """The ``n`` features of transcoder ``tc`` that fire on the most tokens of ``contexts`` (BOS excluded)."""
    acts = collect_activations(model, tc, contexts, range(tc.coder.n_latents))
    density = (acts[:, 1:] > 0).float().mean((0, 1))
    del acts
    return [int(i) for i in torch.topk(density, min(n, len(density))).indices]


def select_features(text: str, model: torch.nn.Module, transcoders: Mapping[int, Transcoder],
                    contexts: Tensor) -> list[tuple[int, int]]:
    """The (layer, index) pairs that ``text`` (see :func:`parse_feature_list`) names, ``topN`` resolved
    on ``contexts``; a layer without a transcoder is a ConfigError."""
    features: list[tuple[int, int]] = []
    for layer, what in parse_feature_list(text):
        if layer not in transcoders:
            raise ConfigError(f"no transcoder for layer {layer} (have {sorted(transcoders)})")
        if what.startswith("top"):
            features += [(layer, i) for i in densest_features(model, transcoders[layer], contexts, int(what[3:]))]
        else:
            features.append((layer, int(what)))
    return features


__all__ = ["densest_features", "feature_root", "logit_root", "parse_feature_list", "select_features"]
