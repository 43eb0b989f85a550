"""Circuit analysis with transcoders on causal LMs (GPT-2 and Llama families, through the adapters).

Modules (import them directly):

- ``parts``: the linear pieces of the model in one layout (attention OV per head, norms, embeddings,
  unembedding); residual-stream "stream points".
- ``replacement``: :func:`record_run` runs the clean model on a prompt and records the linearised
  replacement model (frozen attention patterns and norm scales, feature activations, transcoder
  errors, skip outputs).
- ``nodes``: :class:`Node` and its stable names (``mlp8tc[355]@37``, ``attn7[7]@35``, ``mlp3err@37``).
- ``attribution``: :class:`Attributor`: probes (affine functions of the residual stream) and the exact
  attribution of every child (embeddings, heads through frozen-pattern OV, features, errors, skip,
  bias), batched, without positions x positions x d_model tensors.
- ``graph_rows``, ``attribution_graph``: attribution graphs (every active feature, error node, token
  and top logit; direct effects by one backward sweep per batch of targets; features chosen by
  influence under a budget); ``graph_scores``: influence, pruning, replacement and completeness
  scores, total effects (circuit-tracer's definitions, on the rectangular edge matrix);
  ``graph_json``: own and Neuronpedia JSON; ``interventions``: ablate/scale/set features in the
  frozen or the live world; ``graph_check``: the graph's predictions against ablations.
- ``search``: greedy beam path search (the transcoder paper's lighter mode); ``graph``: merge into a
  graph with error nodes, JSON.
- ``pullback``: input-independent pullbacks, de-embeddings (also through one head's OV), logit
  effects, top-k tables.
- ``dashboard_data``: the numbers behind feature dashboards; ``session``: loading model, transcoders
  and prompts for the CLI.
"""
