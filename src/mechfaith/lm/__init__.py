"""Language models: adapters, loading, corpora, activation stores, splicing, fidelity, file formats,
and the ``mechfaith lm`` commands.

Modules (import them directly; none imports transformers at import time except through
:mod:`mechfaith.lm.models` functions), from the bottom up:

- ``adapters``: where MLP inputs/outputs, residual stream, norms, attention, embeddings and
  unembedding live in GPT-2 / Llama / BERT models; hooks; the MLP as a function (Jacobian reference).
- ``models``: offline built-ins (``smollm2-135m``, ``minilm-l6-v2``, ``gpt2-random``), hub names,
  tiny random models for tests.
- ``activations``: ``ActivationConfig``; one-pass multi-layer collection with early stop, shuffle
  buffer.
- ``model_stream``: batches of one or many layers straight from the model, exactly resumable
  (``ModelActivationStream``; no disk cache).
- ``activation_cache``: the on-disk activation cache (safetensors shards, ``index.json``), its
  reader and its exactly resumable batch stream (``CachedActivationStream``).
- ``config``: ``LMConfig``, ``LMCoderConfig`` and the LM training defaults.
- ``model_cache``: models loaded once per process (``get_model``), ``check_model_name``,
  ``resolve_layer``.
- ``corpus``: documents -> deterministic split by document -> BOS-prefixed contexts; in a model's
  tokens (``get_corpus``, ``ByteTokenizer``, ``eval_contexts``).
- ``splice`` / ``coder_stats`` / ``fidelity``: replace MLP outputs by coders (always restored);
  FVE / L0 / dead and dense latents; CE / KL / loss recovered of one or many splices sharing the
  clean and ablated runs (``evaluate_many``, ``evaluate_fidelity``).
- ``saelens`` (``saelens_format``, ``saelens_read``, ``saelens_write``): SAELens folders both ways,
  every architecture SAELens has that a mechfaith coder can compute, flags honoured or refused;
  ``ImportedCoder`` (a coder with its layer and sites).
- ``sparsify`` (``sparsify_format``, ``sparsify_read``, ``sparsify_write``, ``sparsify_run``): sparsify
  folders and runs both ways, flags honoured or refused; a run read as a set, a set written as a run.
- ``formats``: which format a coder's files are in (``detect_format``), for every command.
- ``safe_unpickle``: ``safe_torch_load``, a restricted unpickler for ``torch.save`` files.
- ``gpt2_transcoders``: the released GPT-2 transcoders (read with ``safe_torch_load``).
- ``coder_files``: ``open_coder`` (any of those formats, with its model, layer and sites).
- ``collect`` / ``train`` / ``evaluate``: the ``mechfaith lm`` commands, each writing a JSON of
  typed results (``CollectResult``, ``TrainCoderResult``, ``EvalResult``) next to its artefacts.
- ``sweep``: SAEs and transcoders over sparsity settings at one layer, trained in one engine
  (``SweepResult``; its figure is drawn by :mod:`mechfaith.reports.sweep_plot`).
- ``layer_set``: a coder at every requested layer, collected in one pass and trained together
  (``train_set``, ``SetResult`` = ``set.json``, ``lm train --layers``).
- ``distributed``: a set's layers shared among torchrun ranks (``split_layers``, ``SetRanks``: the
  exchanges through which every rank gets every rank's summaries, or every rank fails).
- ``coder_set``: a set as every command reads it: the checked manifest (``read_set``), each layer's
  coder folder, one layer, SAELens export of every layer, the summary ``inspect SET`` shows (a
  sparsify run read as a set too).
- ``circuit_tracer`` / ``circuit_tracer_set`` / ``circuit_tracer_clt``: circuit-tracer's per-layer
  transcoder sets and its cross-layer transcoder files, both ways.
- ``convert``: ``mechfaith convert``, a coder, a set or a cross-layer transcoder from any readable
  format into mechfaith, SAELens, sparsify or circuit-tracer files.
- ``set_eval``: a set spliced in all at once, each layer alone and every prefix, against the
  zero-ablated baseline (``evaluate_set``, ``SetEvalResult`` = ``SET/eval.json``, ``lm eval SET``).
- ``faithfulness``: the tokens and reference of the faithfulness report of an LM transcoder.
"""
