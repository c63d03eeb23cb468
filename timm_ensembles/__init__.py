"""timm-ensembles: ensembles of timm models, trained with the methods of their papers.

``import timm_ensembles`` registers every model of this package with timm, so that
``timm.create_model('fdl_resnet50x2')`` and ``timm.create_model('hf-hub:...')`` find them.
"""
from ._distill import DistillationTask, StudentModel
from ._ensemble import EnsembleHead, EnsembleModel
from ._registry import create_model, create_task, get_task_cls, list_ensemble_methods, register_task
from ._snapshots import Snapshots, read_snapshots
from ._split import SplitLayout, get_split_layout, register_split_layout
from ._task import ClassificationTask, Task
from .hub import load_from_hub, push_to_hub
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
from .version import __version__
