"""One module per method; importing them registers their models with timm and their tasks with this package."""
from .collab import CollaborativeNet, CollaborativeTask
from .ens import DeepEnsemble, DeepEnsembleTask
from .fdl import FDLEnsemble, FDLTask
