#!/usr/bin/env python3
"""``accelerate launch train.py ...``: the package's trainer, ``timm_ensembles.train``, from a checkout.

The same trainer runs from an installed package as ``accelerate launch -m timm_ensembles.train ...``,
``python -m timm_ensembles.train ...`` or ``timm-ensembles-train ...``; ``--help`` lists its flags.
"""
import sys

from timm_ensembles.train import main

if __name__ == '__main__':
    sys.exit(main())
