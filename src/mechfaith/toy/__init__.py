"""The toy model of mechanistic (un)faithfulness: y = |x| by a real ReLU MLP, sparse data with a
repeated datapoint, its grid of coders trained at once by the engine, and the experiments of the report.

Modules: ``model`` (AbsMLP), ``data``, ``members`` (MemberSpec: what differs per coder of the grid),
``train`` (train_grid: the grid as a CoderStack in a StackTrainer), ``library`` (the ideal circuits),
``experiments`` (ToyConfig, run_toy).

The multi-hop toy (do cross-layer transcoders take shortcuts?): ``multihop_model`` (the residual
network of chained ANDs), ``multihop_data``, ``multihop_train`` (every replacement in one engine),
``multihop_metrics`` (cross-layer share, intermediate reads, interventions, local Jacobian error),
``multihop_handbuilt`` (a faithful and a shortcut CLT with known answers), ``multihop_claims`` and
``multihop`` (MultihopConfig, run_multihop).
"""
