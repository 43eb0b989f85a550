"""Circuit nodes and their stable, readable names.

=========  =======================  ==============================================================
kind       name                     meaning
=========  =======================  ==============================================================
feature    ``mlp8tc[355]@37``       transcoder feature 355 of layer 8 at token 37
attn       ``attn7[7]@35``          head 7 of layer 7 reading source token 35 (OV, frozen pattern)
skip       ``mlp3skip@37``          the skip connection ``x W_skip`` of layer 3's transcoder
error      ``mlp3err@37``           layer 3's transcoder error ``mlp_out - transcoder(x)`` (a leaf)
mlp        ``mlp3@37``              the whole MLP of a layer without a transcoder (a leaf)
emb        ``emb@37``               the token embedding (a leaf)
pos        ``pos@37``               the learned positional embedding (GPT-2; a leaf)
logit      ``logit[464]@37``        the logit of token 464 (``logit[464-198]@37``: a difference)
=========  =======================  ==============================================================

Graph-only error nodes hang under an expanded node ``N``: ``N:tc_err`` (transcoder errors not
kept as nodes), ``N:bias`` (all constant terms), ``N:pruned`` (children not kept by the search).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mechfaith.errors import ConfigError

KINDS = ("feature", "attn", "skip", "error", "mlp", "emb", "pos", "logit")
LEAF_KINDS = ("error", "mlp", "emb", "pos")


@dataclass(frozen=True)
class Node:
    """A node of the linearised model on one prompt (``index``: feature, head or token id)."""

    kind: str
    pos: int
    layer: int = -1
    index: int = -1
    index2: int = -1  # logit differences: the subtracted token

    @property
    def name(self) -> str:
        k, l, p, i = self.kind, self.layer, self.pos, self.index
        if k == "feature":
            return f"mlp{l}tc[{i}]@{p}"
        if k == "attn":
            return f"attn{l}[{i}]@{p}"
        if k == "skip":
            return f"mlp{l}skip@{p}"
        if k == "error":
            return f"mlp{l}err@{p}"
        if k == "mlp":
            return f"mlp{l}@{p}"
        if k in ("emb", "pos"):
            return f"{k}@{p}"
        if k == "logit":
            return f"logit[{i}]@{p}" if self.index2 < 0 else f"logit[{i}-{self.index2}]@{p}"
        raise ValueError(k)

    @property
    def is_leaf(self) -> bool:
        return self.kind in LEAF_KINDS

    def coordinate(self, n_layers: int) -> int:
        """Where the node sits along the model's depth: 0 embeddings, ``2l + 1`` attention of layer
        ``l``, ``2l + 2`` its MLP / transcoder, ``2 n_layers + 1`` the logits."""
        if self.kind in ("emb", "pos"):
            return 0
        if self.kind == "attn":
            return 2 * self.layer + 1
        if self.kind == "logit":
            return 2 * n_layers + 1
        return 2 * self.layer + 2

    def __str__(self) -> str:
        return self.name


_PATTERNS = [
    (re.compile(r"^mlp(\d+)tc\[(\d+)\]@(\d+)$"), lambda m: Node("feature", int(m[3]), int(m[1]), int(m[2]))),
    (re.compile(r"^attn(\d+)\[(\d+)\]@(\d+)$"), lambda m: Node("attn", int(m[3]), int(m[1]), int(m[2]))),
    (re.compile(r"^mlp(\d+)skip@(\d+)$"), lambda m: Node("skip", int(m[2]), int(m[1]))),
    (re.compile(r"^mlp(\d+)err@(\d+)$"), lambda m: Node("error", int(m[2]), int(m[1]))),
    (re.compile(r"^mlp(\d+)@(\d+)$"), lambda m: Node("mlp", int(m[2]), int(m[1]))),
    (re.compile(r"^(emb|pos)@(\d+)$"), lambda m: Node(m[1], int(m[2]))),
    (re.compile(r"^logit\[(\d+)\]@(\d+)$"), lambda m: Node("logit", int(m[2]), -1, int(m[1]))),
    (re.compile(r"^logit\[(\d+)-(\d+)\]@(\d+)$"),
     lambda m: Node("logit", int(m[3]), -1, int(m[1]), int(m[2]))),
]


def parse_node(name: str) -> Node:
    """The node named ``name`` (inverse of :attr:`Node.name`)."""
    text = name.strip()
    for pattern, make in _PATTERNS:
        m = pattern.match(text)
        if m:
            return make(m)
    raise ConfigError(f"cannot read node name {name!r}; expected e.g. mlp8tc[355]@37, attn7[7]@35 or "
                      f"logit[464]@37")
