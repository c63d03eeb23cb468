#!/usr/bin/env python3
"""``python hub/push.py <run> <org>/<name>``: the package's Hub publisher, ``timm_ensembles.hub.push``, from a checkout.

The same command from an installed package: ``timm-ensembles-push ...`` or ``python -m timm_ensembles.hub.push ...``.
"""
import sys

from timm_ensembles.hub.push import main

if __name__ == '__main__':
    sys.exit(main())
