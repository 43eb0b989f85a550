"""mechfaith: transcoders you can trust.

Layout (each package imports only from those listed before it; the top-level helper modules
``errors``, ``configs``, ``atomic``, ``jsonio`` and ``perf`` sit below them all):
``coders`` -> ``training`` -> ``faithfulness`` -> ``toy`` -> ``lm`` -> ``circuits`` -> ``studies`` -> ``reports`` -> ``cli``.
``__main__`` runs the command line (``python -m mechfaith``, e.g. under torchrun).
"""

__version__ = "0.1.0"
