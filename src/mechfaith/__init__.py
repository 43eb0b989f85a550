"""mechfaith: transcoders you can trust.

Layout (each package imports only from those listed before it):
``coders`` -> ``training`` -> ``faithfulness`` -> ``toy`` -> ``lm`` -> ``circuits`` -> ``reports`` -> ``cli``.
"""

__version__ = "0.1.0"
