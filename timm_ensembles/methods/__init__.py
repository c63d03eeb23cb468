"""One module per method; importing them registers their models with timm and their tasks with this package."""
from .ban import BornAgainEnsemble, BornAgainStudent, BornAgainTask, create_bane
from .collab import CollaborativeNet, CollaborativeTask
from .ens import DeepEnsemble, DeepEnsembleTask
from .ensemble import ModelEnsemble, ModelEnsembleTask, ensemble_of
from .fdl import FDLEnsemble, FDLTask
from .meal import MEALStudent, MEALTask
