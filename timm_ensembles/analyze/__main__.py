"""``python -m timm_ensembles.analyze``."""
import sys

from . import main

sys.exit(main())
