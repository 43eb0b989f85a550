"""The toy model of mechanistic (un)faithfulness: y = |x| by a real ReLU MLP, sparse data with a
repeated datapoint, a batched trainer for grids of coders, and the experiments of the report.

Modules: ``model`` (AbsMLP), ``data``, ``batched`` (stacked-weight coders and their loss),
``train`` (train_grid), ``library`` (the ideal circuits), ``experiments`` (ToyConfig, run_toy).
"""
