"""The configs of the ``mechfaith lm`` commands, built from built-in defaults < a profile < the config
file (sections ``[lm]``, ``[corpus]``, ``[coder]``, ``[train]``) < the flags, and checked before any
model is loaded or any activation collected (parsing stays in :mod:`mechfaith.cli.lm`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from mechfaith.cli.dataclass_args import check_file_keys, dataclass_from_args, load_config_sections

if TYPE_CHECKING:  # imported when a command runs, not when the parser is built
    from mechfaith.lm.config import LMCoderConfig, LMConfig
    from mechfaith.lm.corpus import CorpusConfig
    from mechfaith.training.config import TrainConfig

SECTIONS = ("lm", "corpus", "coder", "train")


def data_configs(args: argparse.Namespace, profile: dict[str, dict[str, Any]] | None = None
                 ) -> tuple[LMConfig, CorpusConfig]:
    """The model's and the corpus's configs. The sections a command without a coder does not use
    (``[coder]`` and ``[train]`` in ``lm collect``) are still checked for unknown keys, so that a typo in
    a config file shared by several commands is reported by the first of them."""
    from mechfaith.lm.config import LMCoderConfig, LMConfig
    from mechfaith.lm.corpus import CorpusConfig
    from mechfaith.training.config import TrainConfig

    files = load_config_sections(getattr(args, "config", None), SECTIONS)
    check_file_keys(LMCoderConfig, files["coder"])
    check_file_keys(TrainConfig, files["train"])
    base = profile or {}
    lm_cfg = dataclass_from_args(LMConfig, args, file_values={**base.get("lm", {}), **files["lm"]})
    corpus_cfg = dataclass_from_args(CorpusConfig, args, prefix="corpus-", file_values=files["corpus"])
    return lm_cfg, corpus_cfg


def train_configs(args: argparse.Namespace, *, train_defaults: dict[str, Any] | None = None,
                  profile: dict[str, dict[str, Any]] | None = None
                  ) -> tuple[LMConfig, CorpusConfig, LMCoderConfig, TrainConfig]:
    """The configs from built-in defaults < ``train_defaults`` < ``profile`` (a set's or --quick's
    defaults) < the config file < the flags."""
    from mechfaith.lm.config import LM_TRAIN_DEFAULTS, LMCoderConfig
    from mechfaith.training.config import TrainConfig

    lm_cfg, corpus_cfg = data_configs(args, profile)
    files = load_config_sections(getattr(args, "config", None), SECTIONS)
    base = profile or {}
    coder_cfg = dataclass_from_args(LMCoderConfig, args, file_values={**base.get("coder", {}), **files["coder"]})
    tvals = {**LM_TRAIN_DEFAULTS, **(train_defaults or {}), **base.get("train", {}), **files["train"]}
    train_cfg = dataclass_from_args(TrainConfig, args, file_values=tvals)
    return lm_cfg, corpus_cfg, coder_cfg, train_cfg
