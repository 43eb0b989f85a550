"""Opening trained coders wherever they come from, with where they sit in the model.

:func:`open_coder` reads a mechfaith coder folder (or a run folder holding ``coder/``), a SAELens
folder (:mod:`mechfaith.lm.saelens`), a sparsify folder, a dictionary_learning ``ae.pt``
(:mod:`mechfaith.lm.dictionary_learning`) or a released GPT-2 transcoder ``.pt``
(:mod:`mechfaith.lm.gpt2_transcoders`) into a :class:`CoderRef` (the coder, its model, layer, sites
and training corpus when recorded); :func:`default_eval_path` is where ``eval.json`` goes;
:func:`coder_corpus_with_source` the coder's corpus with another text source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.files import CONFIG_NAME, load_coder, read_json
from mechfaith.coders.validate import check_fields
from mechfaith.configs import config_from_dict
from mechfaith.errors import CoderFileError
from mechfaith.lm.circuit_tracer import import_circuit_tracer_layer
from mechfaith.lm.corpus import CorpusConfig
from mechfaith.lm.dictionary_learning import import_dictionary_learning
from mechfaith.lm.formats import CLT_FORMATS, FORMATS, SET_FORMATS, detect_format
from mechfaith.lm.gpt2_transcoders import import_gpt2_transcoder
from mechfaith.lm.saelens import import_saelens
from mechfaith.lm.sparsify_read import import_sparsify

CODER_DIR = "coder"
EVAL_JSON = "eval.json"


@dataclass
class CoderRef:
    """A coder to evaluate with where it sits in the model."""

    coder: SparseCoder
    model: str | None
    layer: int | None
    input_site: str | None
    output_site: str | None
    corpus: dict[str, Any] | None
    folder: Path


def open_coder(path: str | Path) -> CoderRef:
    """The coder at ``path`` in any format mechfaith reads (module docstring)."""
    found = detect_format(path)
    path = found.path
    if found.format in SET_FORMATS:
        raise CoderFileError(path, f"this is a {FORMATS[found.format]}, not one coder: give one of its coder "
                                   f"folders, or use a command that takes a set")
    if found.format in CLT_FORMATS:
        raise CoderFileError(path, f"this is a {FORMATS[found.format]}, not one coder (mechfaith converts it: "
                                   f"mechfaith convert --to mechfaith|circuit-tracer)")
    readers = {"saelens": import_saelens, "sparsify": import_sparsify, "gpt2-pt": import_gpt2_transcoder,
               "dictionary-learning": import_dictionary_learning, "circuit-tracer-layer": import_circuit_tracer_layer}
    if found.format in readers:
        imp = readers[found.format](path)
        return CoderRef(imp.coder, imp.model_name, imp.layer, imp.input_site, imp.output_site, None, path)
    coder = load_coder(path)  # checks config.json, its "training" included (a JSON object or null)
    folder = path if path.is_dir() else path.parent
    meta = read_json(folder / CONFIG_NAME).get("training") or {}
    check_fields(folder / CONFIG_NAME, meta, {"model": "str|null", "layer": "int|null", "input_site": "str|null",
                                              "output_site": "str|null", "corpus": "dict|null"})
    return CoderRef(coder.eval(), meta.get("model"), meta.get("layer"), meta.get("input_site"),
                    meta.get("output_site"), meta.get("corpus"), folder)


def default_eval_path(ref: CoderRef | Path) -> Path:
    """``eval.json`` beside the coder folder (in its run folder); ``ref`` or its folder (:func:`coder_location`)."""
    folder = ref.folder if isinstance(ref, CoderRef) else ref
    if not folder.name:  # "." or ".."
        folder = folder.resolve()
    if not folder.name:  # the root folder
        return folder / EVAL_JSON
    if folder.name == CODER_DIR:
        return folder.parent / EVAL_JSON
    return folder.with_name(folder.name + ".eval.json")


def coder_location(path: str | Path) -> Path:
    """Where :func:`open_coder` finds the coder of ``path`` (its ``CoderRef.folder``), without reading it:
    a run folder's ``coder/``, a SAELens or coder folder itself, a ``.pt`` file itself, a file's folder."""
    path = Path(path)
    if path.is_dir() and (path / CODER_DIR).is_dir() and not (path / CONFIG_NAME).is_file():
        return path / CODER_DIR
    if path.is_file() and path.suffix != ".pt":
        return path.parent
    return path


def coder_corpus_with_source(coder_path: str | Path, source: str | None) -> CorpusConfig | None:
    """The corpus a coder was trained on, with its text source replaced by ``source`` (None: keep
    the coder's own corpus, returned as None so callers use the recorded one)."""
    if not source:
        return None
    data = dict(open_coder(coder_path).corpus or {})
    data["source"] = source
    return config_from_dict(CorpusConfig, data)
