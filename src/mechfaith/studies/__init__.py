"""Studies: experiments that use the library end to end to answer one question.

Sits between ``circuits/`` and ``reports/`` in the layer order: a study may import ``coders/`` ..
``circuits/``; ``reports/`` and ``cli/`` may import studies.

Modules (import them directly):

- ``memorization``: does a transcoder of a real MLP memorize a repeated passage planted into its
  training data, and does Jacobian matching prevent it (:func:`run_experiment`, its typed results
  :class:`ExperimentResult` and :class:`CellResult`; ``mechfaith faithfulness experiment``).
- ``memorization_config``: its settings, the ``--quick`` variant, the built-in passages, the sites.
- ``memorization_arms``: the arms (TopK, ReLU with tanh-L1, JumpReLU; with or without a skip).
- ``memorization_cells``: the cells' list, names, keys, training and results.
- ``memorization_data``: the study's activations collected once per site and held in memory.
- ``memorization_metrics``: what the study measures for one trained transcoder (one cell).
- ``memorization_specific``: the passage-specific (10x) features and the fit's linear/feature parts.
- ``memorization_findings``: the table (means and SDs over seeds) and the plain-language findings.
"""
