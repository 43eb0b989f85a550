"""Loading what a circuit analysis needs: a model, its transcoders (from coder folders), prompts.

A transcoder is given as a path (a mechfaith coder or run folder, a SAELens folder, a released
GPT-2 ``.pt``) whose metadata names its layer and sites, or as ``LAYER=PATH`` to say the layer; a
set folder (``set.json``, from ``lm train --layers``) stands for every layer's transcoder of the set
(:func:`expand_coder_specs`, the one place specs are read).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from mechfaith.circuits.replacement import TC_INPUT_SITES, Transcoder, clt_transcoders
from mechfaith.coders.clt_files import find_clt_folder, load_clt, read_clt_meta
from mechfaith.coders.validate import check_fields
from mechfaith.errors import ConfigError, InputError
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.coder_set import is_coder_set, set_coder_folders
from mechfaith.lm.corpus import ByteTokenizer
from mechfaith.lm.layer_set import layers_text
from mechfaith.lm.models import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class CircuitSession:
    lm: LoadedModel
    transcoders: dict[int, Transcoder]

    def tokenize(self, prompt: str, add_bos: bool = True) -> Tensor:
        """Token ids [seq] of ``prompt`` (BOS first unless the tokenizer already adds it)."""
        tok = self.lm.tokenizer
        bos = self.lm.bos_token_id
        if tok is None:
            config: Any = self.lm.model.config  # a transformers config (nn.Module.__getattr__: Tensor | Module)
            ids = ByteTokenizer(int(config.vocab_size), 0 if bos is None else bos)(prompt)["input_ids"]
        else:
            ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if not ids:
            raise InputError("the prompt has no tokens")
        return torch.tensor(ids, dtype=torch.long)

    def token_str(self, token: int) -> str:
        tok = self.lm.tokenizer
        if tok is None:
            return str(token)
        try:
            return str(tok.decode([int(token)]))
        except Exception:  # noqa: BLE001 - an odd id must not break a report
            return str(token)

    def token_id(self, text: str) -> int:
        """A token id from an integer string or a text that is exactly one token."""
        try:
            return int(text)
        except ValueError:
            pass
        tok = self.lm.tokenizer
        if tok is None:
            raise ConfigError(f"the model has no tokenizer: give the token as an id, not {text!r}")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"{text!r} is {len(ids)} tokens, not one; give a token id instead")
        return int(ids[0])


def expand_coder_specs(specs: Sequence[str]) -> list[tuple[int | None, str]]:
    """(layer or None, path) of each ``PATH`` or ``LAYER=PATH`` spec, a set folder expanded into
    each of its layers' coders (its manifest checked whole first; a set names its layers, so
    ``LAYER=SET`` is refused)."""
    out: list[tuple[int | None, str]] = []
    for spec in specs:
        layer: int | None = None
        path = spec
        if "=" in spec and spec.split("=", 1)[0].strip().isdigit():
            layer_s, path = spec.split("=", 1)
            layer = int(layer_s)
        if not is_coder_set(path):
            out.append((layer, path))
            continue
        folders = set_coder_folders(path)
        if layer is not None:
            raise ConfigError(f"{path} is a coder set of layers {layers_text(folders)}: give it without {layer}= "
                              f"(it names its layers), or give one layer's coder folder")
        out.extend((l, str(p)) for l, p in folders.items())
    return out


def load_transcoders(specs: Sequence[str]) -> tuple[dict[int, Transcoder], str | None]:
    """Transcoders from ``PATH``, ``LAYER=PATH`` or set-folder specs (:func:`expand_coder_specs`); also the
    model named in their metadata."""
    tcs: dict[int, Transcoder] = {}
    model_name = None
    for layer, path in expand_coder_specs(specs):
        clt_folder = find_clt_folder(path)
        if clt_folder is not None:  # a cross-layer transcoder: one Transcoder per block layer
            if layer is not None:
                raise ConfigError(f"{path} is a cross-layer transcoder (it names its layers): give it without {layer}=")
            meta = read_clt_meta(clt_folder).get("training") or {}
            check_fields(clt_folder / "config.json", meta, {"model": "str|null", "input_site": "str|null",
                                                            "output_site": "str|null"})
            site = meta.get("input_site") or "mlp_in"
            if site not in TC_INPUT_SITES:
                raise ConfigError(f"{path}: input site {site!r} is not supported (use {', '.join(TC_INPUT_SITES)})")
            for l, tc in clt_transcoders(load_clt(clt_folder), site, meta.get("output_site") or "mlp_out").items():
                if l in tcs:
                    raise ConfigError(f"two transcoders for layer {l}")
                tcs[l] = tc
            model_name = model_name or meta.get("model")
            continue
        ref = open_coder(path)
        layer = layer if layer is not None else ref.layer
        if layer is None:
            raise ConfigError(f"{path}: the coder does not say which layer it replaces; give LAYER={path}")
        if ref.coder.cfg.kind != "transcoder":
            raise ConfigError(f"{path}: circuit analysis needs transcoders, this is a {ref.coder.cfg.kind}")
        site = ref.input_site or "mlp_in"
        if site not in TC_INPUT_SITES:
            raise ConfigError(f"{path}: input site {site!r} is not supported (use {', '.join(TC_INPUT_SITES)})")
        if layer in tcs:
            raise ConfigError(f"two transcoders for layer {layer}")
        coder = ref.coder.eval()
        for p in coder.parameters():
            p.requires_grad_(False)
        tcs[int(layer)] = Transcoder(int(layer), coder, site, ref.output_site or "mlp_out")
        model_name = model_name or ref.model
    if not tcs:
        raise ConfigError("give at least one transcoder (--coders)")
    return tcs, model_name


def open_session(model: str | None, coder_specs: Sequence[str], device: str = "cpu") -> CircuitSession:
    tcs, meta_model = load_transcoders(coder_specs)
    name = model or meta_model
    if not name:
        raise ConfigError("the coders do not name their model: give --model")
    lm = load_model(name, device=device)
    for l, tc in tcs.items():
        lm.adapter.check_layer(l)
        tc.coder.to(device)
        tc.cross = {t: w.to(device) for t, w in tc.cross.items()}
    return CircuitSession(lm, tcs)


def resolve_pos(pos: int, seq: int) -> int:
    p = pos + seq if pos < 0 else pos
    if not 0 <= p < seq:
        raise ConfigError(f"position {pos} is out of range for a prompt of {seq} tokens")
    return p


def meta_of(session: CircuitSession) -> dict[str, Any]:
    return {"model": session.lm.name, "transcoder_layers": sorted(session.transcoders),
            "input_sites": {str(l): t.input_site for l, t in session.transcoders.items()}}
