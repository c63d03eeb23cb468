"""timm-ensembles: ensembles of timm models, trained with the methods of their papers.

``import timm_ensembles`` registers every model of this package with timm, so that
``timm.create_model('fdl_resnet50x2')`` and ``timm.create_model('hf-hub:...')`` find them.
"""
import warnings

from .export import export
from .hub.push import push_to_hub
from .methods import (
    BornAgainEnsemble,
    BornAgainStudent,
    BornAgainTask,
    CollaborativeNet,
    CollaborativeTask,
    DeepEnsemble,
    DeepEnsembleTask,
    FDLEnsemble,
    FDLTask,
    MEALStudent,
    MEALTask,
    ModelEnsemble,
    ModelEnsembleTask,
    create_bane,
    ensemble_of,
)
from .models.distill import DistillationTask, StudentModel
from .models.ensemble import EnsembleHead, EnsembleModel
from .models.hub import load_from_hub
from .models.registry import create_model, create_task, get_task_cls, list_ensemble_methods, register_task
from .models.split import SplitLayout, get_split_layout, register_split_layout
from .task import CrossEntropyTask, Task
from .train.snapshots import Snapshots, read_snapshots
from .version import __version__

# `timm_ensembles.export` is the function (the module of the same name is imported above, so that no later import of
# it rebinds the name); `python -m timm_ensembles.export` then finds the module imported already, which runpy warns of
# and which is harmless here: the command runs in __main__ and uses nothing of the copy imported with the package
warnings.filterwarnings('ignore', message=r"'timm_ensembles\.export' found in sys\.modules", category=RuntimeWarning)
# the same for `python -m timm_ensembles.hub.push`, whose package imports it for push_to_hub
warnings.filterwarnings('ignore', message=r"'timm_ensembles\.hub\.push' found in sys\.modules", category=RuntimeWarning)
