"""Language models: adapters, loading, corpora, activation stores, splicing, fidelity, file formats.

Modules (import them directly; none imports transformers at import time except through
:mod:`mechfaith.lm.models` functions):

- ``adapters``: where MLP inputs/outputs, residual stream, norms, attention, embeddings and
  unembedding live in GPT-2 / Llama / BERT models; hooks; the MLP as a function (Jacobian reference).
- ``models``: offline built-ins (``smollm2-135m``, ``minilm-l6-v2``, ``gpt2-random``), hub names,
  tiny random models for tests.
- ``corpus``: documents -> deterministic split by document -> BOS-prefixed contexts.
- ``activations``: one-pass multi-layer collection with early stop, shuffle buffer, safetensors
  shards, batch streams for the trainer.
- ``splice`` / ``fidelity``: replace MLP outputs by coders (always restored); CE / KL / loss
  recovered / FVE / L0 / dead and dense latents.
- ``formats``: SAELens export/import; the released GPT-2 transcoders via a restricted unpickler.
- ``pipeline``: collect -> train (foundation trainer, optional Jacobian matching against the real
  MLP) -> eval, each writing a JSON next to its artefacts (what ``mechfaith lm`` runs).
- ``sweep``: SAEs and transcoders over sparsity settings at one layer; L0 vs spliced-CE figure.
"""
