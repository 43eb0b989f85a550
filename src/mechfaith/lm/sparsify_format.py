"""What mechfaith knows of sparsify's (EleutherAI) folder format: file names, config fields,
hookpoint names, and which folders are sparsify folders or runs.

sparsify's ``SparseCoder.save_to_disk`` writes a folder with ``cfg.json`` (its
``SparseCoderConfig`` plus ``d_in``: ``activation`` "topk" or "groupmax", ``expansion_factor``,
``normalize_decoder``, ``num_latents`` (0: ``d_in * expansion_factor``), ``k``, ``multi_topk``,
``skip_connection``, ``transcode``) and ``sae.safetensors``: ``encoder.weight`` [num_latents, d_in],
``encoder.bias`` [num_latents], ``W_dec`` [num_latents, d_in], ``b_dec`` [d_in] and, with a skip
connection, ``W_skip`` [d_in, d_in] (applied as ``x @ W_skip.T``). A sparsify transcoder's output
has the input's width (``d_out == d_in``).

Its computation: ``pre = relu(encoder(x - b_dec))`` for an SAE, ``relu(encoder(x))`` for a
transcoder (``transcode``: no ``b_dec`` subtracted, as ``b_dec`` is in the output space); the ``k``
largest of ``pre`` are the latents; ``out = latents @ W_dec + b_dec (+ x @ W_skip.T)``.

A training run (``python -m sparsify``) writes one such folder per hookpoint, named by the
hookpoint (a module path of the model relative to its base model: ``layers.3`` the block's output,
``layers.3.mlp`` the MLP), beside the run's ``config.json`` (its ``TrainConfig``, with ``model``
when run from the command line). sparsify hooks module *outputs* for SAEs, and a module's input and
output for transcoders: :func:`parse_hookpoint` gives the layer and mechfaith sites of a hookpoint,
:func:`hookpoint_for` the hookpoint of a layer and sites (refused when sparsify cannot hook them).
"""

from __future__ import annotations

import re
from pathlib import Path

from mechfaith.errors import ConfigError

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
RUN_CONFIG = "config.json"  # a run's TrainConfig (sparsify's trainer), beside the hookpoint folders
META_KEY = "mechfaith"  # our entry in the safetensors header: exact config, layer, sites, model

# cfg.json as sparsify 1.3 writes it, in its order (``d_in`` added by save_to_disk)
CFG_FIELDS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
              "skip_connection", "transcode", "d_in")
CFG_KINDS = {"activation": "str", "expansion_factor": "int", "normalize_decoder": "bool", "num_latents": "int",
             "k": "int", "multi_topk": "bool", "skip_connection": "bool", "transcode": "bool", "d_in": "int",
             "signed": "bool", "dtype": "str|null"}
# fields other sparsify versions write that change nothing mechfaith computes (``dtype``: the
# weights' dtype, read from the file anyway)
HARMLESS_FIELDS = ("dtype",)
READ_ACTIVATIONS = ("topk",)
REFUSED_ACTIVATIONS = {"groupmax": "the largest latent of each of k groups (no such mechfaith activation)"}

# hookpoints: ``<layers>.<L>`` (the block) or ``<layers>.<L>.<module>``; the module lists of the
# model families mechfaith runs (Llama ``layers``, GPT-2 ``h``, BERT ``encoder.layer``), and others'
_HOOKPOINT = re.compile(r"(?:.*\.)?(?:layers|layer|h|blocks)\.(\d+)((?:\.\w+)*)")
MLP_MODULES = ("mlp",)
NORM_MODULES = ("post_attention_layernorm", "ln_2")  # the pre-MLP norm: its output is mlp_in


def parse_hookpoint(name: str, transcoder: bool) -> tuple[int | None, str | None, str | None]:
    """(layer, input site, output site) of a sparsify hookpoint: ``layers.3`` reads the block's
    output (``resid_post``; a transcoder maps ``resid_pre`` to it), ``layers.3.mlp`` the MLP's
    output (``mlp_out``; a transcoder maps ``mlp_in`` to it), ``layers.3.post_attention_layernorm``
    / ``h.3.ln_2`` the pre-MLP norm's output (``mlp_in``, SAEs). Unknown modules: sites None; no
    layer in the name: all None."""
    m = _HOOKPOINT.fullmatch(name)
    if not m:
        return None, None, None
    layer, module = int(m.group(1)), m.group(2).lstrip(".")
    if module == "":
        return (layer, "resid_pre", "resid_post") if transcoder else (layer, "resid_post", "resid_post")
    if module in MLP_MODULES:
        return (layer, "mlp_in", "mlp_out") if transcoder else (layer, "mlp_out", "mlp_out")
    if module in NORM_MODULES and not transcoder:
        return layer, "mlp_in", "mlp_in"
    return layer, None, None


def layers_path(model_name: str | None) -> tuple[str, str]:
    """The module list of blocks and the pre-MLP norm's name in ``model_name``'s family, as sparsify
    names hookpoints: GPT-2 ``h`` / ``ln_2``, otherwise Llama's ``layers`` /
    ``post_attention_layernorm`` (SmolLM2, sparsify's default model, and mechfaith's)."""
    if model_name and "gpt2" in model_name.lower():
        return "h", "ln_2"
    return "layers", "post_attention_layernorm"


def hookpoint_for(layer: int | None, input_site: str | None, output_site: str | None, kind: str,
                  model_name: str | None = None) -> str:
    """The sparsify hookpoint that reads exactly a coder's sites (:func:`parse_hookpoint` reversed);
    a :class:`ConfigError` when sparsify cannot hook them (it hooks module outputs, and a
    transcoder's module input and output)."""
    if layer is None:
        raise ConfigError("the coder does not say which layer it belongs to: a sparsify run names each "
                          "coder by its hookpoint (layers.<L>...)")
    blocks, norm = layers_path(model_name)
    if kind == "transcoder":
        names = {("mlp_in", "mlp_out"): f"{blocks}.{layer}.mlp", ("resid_pre", "resid_post"): f"{blocks}.{layer}"}
        where = names.get((str(input_site), str(output_site)))
    else:
        where = {"resid_post": f"{blocks}.{layer}", "mlp_out": f"{blocks}.{layer}.mlp",
                 "mlp_in": f"{blocks}.{layer}.{norm}"}.get(str(input_site))
    if where is None:
        sites = f"{input_site} -> {output_site}" if kind == "transcoder" else str(input_site)
        raise ConfigError(f"sparsify has no hookpoint for a {kind} on {sites} at layer {layer} (its hookpoints "
                          f"are module outputs: transcoders mlp_in -> mlp_out or resid_pre -> resid_post, SAEs "
                          f"resid_post, mlp_out or mlp_in); nothing written")
    return where


def is_sparsify_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding sparsify's two files."""
    p = Path(path)
    return p.is_dir() and (p / SPARSIFY_CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file()


def natural_key(name: str) -> list[int | str]:
    """``layers.10`` after ``layers.9`` (sparsify sorts hookpoints naturally)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def run_hookpoints(path: str | Path) -> dict[str, Path]:
    """The hookpoint folders of a sparsify run (its sub-folders that are sparsify folders), naturally
    sorted; empty when ``path`` is none (a folder that is itself a sparsify folder is not a run)."""
    p = Path(path)
    if not p.is_dir() or is_sparsify_folder(p):
        return {}
    found = [c for c in p.iterdir() if not c.name.startswith(".") and is_sparsify_folder(c)]
    return {c.name: c for c in sorted(found, key=lambda c: natural_key(c.name))}


def is_sparsify_run(path: str | Path) -> bool:
    """Whether ``path`` is a sparsify run folder (at least one hookpoint folder inside)."""
    return bool(run_hookpoints(path))
