"""Which format a coder's files are in, told from the files themselves (:func:`detect_format`).

Recognised (:data:`FORMATS`): a mechfaith coder folder (``config.json`` + ``weights.safetensors``;
a ``train`` run folder holding ``coder/`` too), a mechfaith coder set (``set.json``), a SAELens
folder (``cfg.json`` + ``sae_weights.safetensors``), a sparsify folder (``cfg.json`` +
``sae.safetensors``), a sparsify run (sub-folders that are sparsify folders, one per hookpoint),
a dictionary_learning dictionary (``ae.pt`` or a checkpoint ``ae_<step>.pt``, or a folder holding
``ae.pt`` beside its ``config.json``), a circuit-tracer set (``config.yaml`` and/or
``layer_<i>.safetensors``; one layer file of it is one coder), a legacy GPT-2 transcoder ``.pt``
(any other ``.pt``), and two kinds of cross-layer transcoder (:data:`CLT_FORMATS`, neither a coder
nor a set): a mechfaith CLT folder (``config.json`` of format ``mechfaith.clt``; an ``lm train --clt``
run folder holding ``clt/``) and a circuit-tracer
CLT (``W_enc_<i>`` / ``W_dec_<i>.safetensors``, a ``config.yaml`` of model_kind
``cross_layer_transcoder``).
One of the folder's files may be given for the folder.
A ``cfg.json`` without either weights file is told by its fields (SAELens's ``d_sae``,
``architecture``, ``hook_name``...; sparsify's ``num_latents``, ``expansion_factor``,
``transcode``...), so that the error names the missing file of the right format. Anything else is
one :class:`~mechfaith.errors.CoderFileError` line listing the recognised formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mechfaith.coders.clt_files import RUN_DIR, is_clt_folder
from mechfaith.coders.files import CONFIG_NAME, WEIGHTS_NAME, read_json
from mechfaith.errors import CoderFileError, MechfaithError
from mechfaith.lm.circuit_tracer import CT_CONFIG, LAYER_FILE, is_circuit_tracer_set
from mechfaith.lm.circuit_tracer_clt import DEC_FILE, ENC_FILE, is_circuit_tracer_clt
from mechfaith.lm.dictionary_learning import DL_WEIGHTS, is_dictionary_learning_file
from mechfaith.lm.saelens_format import SAELENS_CFG, SAELENS_WEIGHTS
from mechfaith.lm.sparsify_format import SPARSIFY_WEIGHTS, is_sparsify_run

SET_JSON = "set.json"  # mechfaith.lm.layer_set.SET_JSON (that module imports this one's users)
RUN_CODER_DIR = "coder"  # mechfaith.lm.coder_files.CODER_DIR: a train run folder's coder

FORMATS = {
    "mechfaith": f"mechfaith coder folder ({CONFIG_NAME} + {WEIGHTS_NAME}, or a run folder holding coder/)",
    "mechfaith-set": f"mechfaith coder set ({SET_JSON})",
    "saelens": f"SAELens folder ({SAELENS_CFG} + {SAELENS_WEIGHTS})",
    "sparsify": f"sparsify folder ({SAELENS_CFG} + {SPARSIFY_WEIGHTS})",
    "sparsify-run": "sparsify run (one sparsify folder per hookpoint)",
    "dictionary-learning": f"dictionary_learning dictionary ({DL_WEIGHTS}, with its config.json)",
    "circuit-tracer": f"circuit-tracer transcoder set ({CT_CONFIG} + layer_<i>.safetensors)",
    "circuit-tracer-layer": "circuit-tracer layer file (layer_<i>.safetensors of a set)",
    "gpt2-pt": "legacy GPT-2 transcoder (.pt)",
    "mechfaith-clt": f"mechfaith cross-layer transcoder ({CONFIG_NAME} of format mechfaith.clt + {WEIGHTS_NAME})",
    "circuit-tracer-clt": "circuit-tracer cross-layer transcoder (W_enc_<i> / W_dec_<i>.safetensors, config.yaml)",
}
SET_FORMATS = ("mechfaith-set", "sparsify-run", "circuit-tracer")
CLT_FORMATS = ("mechfaith-clt", "circuit-tracer-clt")
SAELENS_FIELDS = ("d_sae", "architecture", "hook_name", "hook_point", "sae_lens_version", "metadata",
                  "apply_b_dec_to_input")
SPARSIFY_FIELDS = ("num_latents", "expansion_factor", "transcode", "skip_connection", "multi_topk",
                   "normalize_decoder")
FILE_NAMES = {CONFIG_NAME: "mechfaith", WEIGHTS_NAME: "mechfaith", SAELENS_WEIGHTS: "saelens",
              SPARSIFY_WEIGHTS: "sparsify", SET_JSON: "mechfaith-set"}


@dataclass(frozen=True)
class Detected:
    """A format and the path to read it from (the folder, for a file of a folder)."""

    format: str
    path: Path


def recognised() -> str:
    """The recognised formats, for error messages."""
    return "; ".join(FORMATS.values())


def _cfg_json_format(folder: Path) -> str | None:
    """SAELens or sparsify from ``cfg.json``'s files beside it, else from its fields."""
    if (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    try:
        data = read_json(folder / SAELENS_CFG)
    except MechfaithError:
        return None
    if not isinstance(data, dict):
        return None
    if any(k in data for k in SAELENS_FIELDS):
        return "saelens"
    if any(k in data for k in SPARSIFY_FIELDS):
        return "sparsify"
    return None


def _folder_format(folder: Path) -> Detected | None:
    if (folder / SET_JSON).is_file():
        return Detected("mechfaith-set", folder)
    if (folder / DL_WEIGHTS).is_file():  # its config.json is not mechfaith's
        return Detected("dictionary-learning", folder)
    if (folder / CONFIG_NAME).is_file() or (folder / WEIGHTS_NAME).is_file():
        if is_clt_folder(folder):
            return Detected("mechfaith-clt", folder)
        if is_sparsify_run(folder):  # sparsify's trainer writes the run's config.json beside them
            return Detected("sparsify-run", folder)
        return Detected("mechfaith", folder)
    if (folder / SAELENS_CFG).is_file():
        found = _cfg_json_format(folder)
        return Detected(found, folder) if found else None
    if is_sparsify_run(folder):
        return Detected("sparsify-run", folder)
    if is_circuit_tracer_clt(folder):
        return Detected("circuit-tracer-clt", folder)
    if is_circuit_tracer_set(folder):
        return Detected("circuit-tracer", folder)
    if (folder / RUN_CODER_DIR).is_dir():
        return Detected("mechfaith", folder / RUN_CODER_DIR)
    if (folder / RUN_DIR).is_dir() and is_clt_folder(folder / RUN_DIR):
        return Detected("mechfaith-clt", folder / RUN_DIR)
    return None


def detect_format(path: str | Path) -> Detected:
    """The format of the coder (or set) at ``path`` (module docstring)."""
    p = Path(path)
    if not p.exists():
        raise CoderFileError(p, "no such file or folder")
    found: Detected | None
    if p.is_file():
        if is_dictionary_learning_file(p):
            found = Detected("dictionary-learning", p)
        elif p.suffix == ".pt":
            found = Detected("gpt2-pt", p)
        elif is_circuit_tracer_clt(p.parent) and (p.name == CT_CONFIG or ENC_FILE.fullmatch(p.name)
                                                  or DEC_FILE.fullmatch(p.name)):
            found = Detected("circuit-tracer-clt", p.parent)
        elif p.name == CT_CONFIG:
            found = Detected("circuit-tracer", p.parent)
        elif LAYER_FILE.fullmatch(p.name) and is_circuit_tracer_set(p.parent):
            found = Detected("circuit-tracer-layer", p)
        elif p.name == SAELENS_CFG:
            fmt = _cfg_json_format(p.parent)
            found = Detected(fmt, p.parent) if fmt else None
        else:
            fmt = FILE_NAMES.get(p.name)
            if fmt == "mechfaith" and is_clt_folder(p.parent):
                fmt = "mechfaith-clt"
            found = Detected(fmt, p.parent) if fmt else None
    else:
        found = _folder_format(p)
    if found is None:
        raise CoderFileError(p, f"not a coder in a format mechfaith reads (recognised: {recognised()})")
    return found
