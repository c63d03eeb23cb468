"""The trainer: ``python -m timm_ensembles.train``, ``timm-ensembles-train``, ``accelerate launch train.py`` (in a
checkout).

Modules: ``cli`` (the command line: ``get_args_parser``, ``parse_args``), ``flags`` (the checks of the flags' values),
``optim`` (optimizer and scheduler names, the schedule), ``trainer`` (the run: ``main``, ``train``, its set-up),
``loop`` (an epoch and the run's end), ``state`` (the training state a checkpoint carries), ``inputs`` (datasets and
loaders), ``resume`` (the output folder claimed, a resumed run checked), ``outputs`` (results, snapshots,
``summary.csv``), ``engine`` (the training and evaluation loops), ``checkpoint`` (training checkpoints),
``snapshots``, ``device`` (device defaults), ``summary`` (the lines that open a run).
"""
from .cli import TRACKERS, get_args_parser, import_user_module, parse_args
from .flags import IDENTITY_FLAGS, check_args
from .loop import epoch_seed
from .trainer import main, train, train_generations

__all__ = ['main', 'train', 'train_generations', 'get_args_parser', 'parse_args', 'check_args', 'import_user_module',
           'epoch_seed', 'IDENTITY_FLAGS', 'TRACKERS']
