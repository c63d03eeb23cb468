"""``python -m timm_ensembles.analysis``."""
import sys

from . import main

sys.exit(main())
