"""``python -m mechfaith``: the ``mechfaith`` command, e.g. under torchrun
(``torchrun --nproc_per_node 2 -m mechfaith lm train --layers all --out SET``)."""

from mechfaith.cli.main import entry

if __name__ == "__main__":
    entry()
