"""CLT files: a folder with ``config.json`` (format ``mechfaith.clt``) and ``weights.safetensors``.

The same layout and checks as a coder folder (:mod:`mechfaith.coders.files`): written atomically,
no pickle, the weights' SHA-256 required, tensor names and shapes checked against the config before
anything is allocated, dtypes and finiteness checked (:mod:`mechfaith.coders.validate`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.coders.files import (
    CONFIG_NAME,
    load_module_folder,
    read_folder_meta,
    read_json,
    resolve_coder_folder,
    save_module_folder,
)
from mechfaith.errors import CoderFileError

FORMAT = "mechfaith.clt"
FORMAT_VERSION = 1
RUN_DIR = "clt"  # the CLT folder in an ``lm train --clt`` run folder


def save_clt(clt: CrossLayerTranscoder, folder: str | os.PathLike[str],
             training: dict[str, Any] | None = None) -> Path:
    """Save a CLT into ``folder`` (replaced whole, atomically). Returns the folder."""
    return save_module_folder(dict(clt.state_dict()), clt.cfg, folder, FORMAT, FORMAT_VERSION, training)


def folder_format(path: str | os.PathLike[str]) -> str | None:
    """The ``format`` field of a folder's ``config.json`` (None when there is none or it is unreadable)."""
    try:
        meta = read_json(resolve_coder_folder(path) / CONFIG_NAME)
    except CoderFileError:
        return None
    value = meta.get("format") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def is_clt_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a mechfaith CLT folder (or one of its two files)."""
    return folder_format(path) == FORMAT


def find_clt_folder(path: str | os.PathLike[str]) -> Path | None:
    """The CLT folder at ``path``: a CLT folder itself, or a run folder holding one as
    :data:`RUN_DIR` (``lm train --clt``); None when there is none."""
    p = Path(path)
    for folder in (p / RUN_DIR, p):
        if folder.is_dir() and is_clt_folder(folder):
            return folder
    return None


def read_clt_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked contents of a CLT's ``config.json``."""
    return read_folder_meta(path, FORMAT, FORMAT_VERSION, "mechfaith cross-layer transcoder")


def load_clt(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Load a CLT saved by :func:`save_clt`; damage of any kind raises :class:`CoderFileError`."""
    return load_module_folder(path, read_clt_meta, CLTConfig, CrossLayerTranscoder, map_location)
