"""``python -m timm_ensembles.train`` (and ``accelerate launch -m timm_ensembles.train``)."""
import os
import sys

from . import main

# argparse names the program after sys.argv[0], here this __main__.py: name it train.py, as the module was named
sys.argv[0] = os.path.join(os.path.dirname(sys.argv[0]), 'train.py')
sys.exit(main())
