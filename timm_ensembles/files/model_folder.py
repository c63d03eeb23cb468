"""An exported model folder, timm's Hugging Face format: the one place that names its files and writes it.

``export_folder`` writes ``config.json`` and ``model.safetensors`` (what ``timm.models.save_for_hf`` writes and a Hub
repo holds), with the package version and the weights' sha256 recorded in ``config.json``; ``check_weights`` refuses
weights whose bytes are not the recorded ones. The trainer, the Hub code and the builder take the names from here.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.atomic import TEMPORARY_PREFIX, follow_umask, fsync_dir
from ..version import __version__

__all__ = ['CONFIG', 'WEIGHTS', 'MODEL_CARD', 'PICKLED_WEIGHTS', 'VERSION_KEY', 'WEIGHTS_SHA_KEY', 'export_folder',
           'check_weights', 'file_sha256']

# the files of a model folder: timm's config and safetensors weights, the Hub's model card, and the pickled weights
# of older exports (refused: loading them runs code)
CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
MODEL_CARD = 'README.md'
PICKLED_WEIGHTS = 'pytorch_model.bin'
# the config.json entry naming the timm-ensembles version that wrote an export
VERSION_KEY = 'timm_ensembles_version'
# the sha256 of model.safetensors, recorded in config.json beside it: a flipped byte in the weights is an error on load
WEIGHTS_SHA_KEY = 'timm_ensembles_weights_sha256'


def export_folder(
        model: nn.Module,
        folder: str | Path,
        model_config: dict[str, Any] | None = None,
        model_args: dict[str, Any] | None = None,
        data_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` in timm's Hugging Face folder format (``config.json`` + ``model.safetensors``).

    ``timm.models.save_for_hf`` writes into a temporary folder; its files are then moved into ``folder``,
    weights first, so that a ``config.json`` in ``folder`` always describes complete weights beside it. Weights in
    another memory format than the default (channels_last, a GPU default of train.py) are written as contiguous
    copies; the model keeps its own format.
    """
    from timm.models import save_for_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the version that wrote the config, so that an older installation loading it can say why it cannot
    model_config = {**(model_config or {}), VERSION_KEY: __version__}
    # a kill leaves this hidden folder (a whole model): the next run's sweep_temporaries removes it
    tmp = Path(tempfile.mkdtemp(prefix=f'{TEMPORARY_PREFIX}export.', dir=folder))
    try:
        with _contiguous_state_dict(model):
            save_for_hf(model, tmp, model_config=model_config, model_args=model_args, safe_serialization=True,
                        data_config=data_config)
        config = json.loads((tmp / CONFIG).read_text())  # validated before it replaces anything
        config[WEIGHTS_SHA_KEY] = file_sha256(tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2), encoding='utf-8')
        follow_umask(tmp / WEIGHTS, tmp / CONFIG)  # safetensors writes its file 0600
        for name in (WEIGHTS, CONFIG):
            with open(tmp / name, 'rb') as f:
                os.fsync(f.fileno())
            os.replace(tmp / name, folder / name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _contiguous_state_dict(model: nn.Module):
    """While open, ``model.state_dict()`` holds contiguous copies of its non-contiguous tensors: safetensors refuses
    those (channels_last convolution weights are), and converting the model itself would change the live model's
    memory format under a running training."""
    def hook(module, state_dict, prefix, local_metadata):
        for key, value in state_dict.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                state_dict[key] = value.contiguous()

    handle = model.register_state_dict_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()



def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, as ``export_folder`` records it for model.safetensors (hex)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def check_weights(config: dict[str, Any], weights: str | Path, source: str) -> None:
    """Refuse weights that are not the bytes ``config`` (a config.json written by ``export_folder``) was written with.

    Raises:
        RuntimeError: The file's sha256 differs from the one recorded (a corrupted download or disk, an edited file).
    """
    expected = config.get(WEIGHTS_SHA_KEY)
    if expected is None:
        return  # written by timm itself or by an older version: nothing recorded to compare
    found = file_sha256(weights)
    if found != expected:
        raise RuntimeError(
            f"The weights of '{source}' are not the ones its config.json was written with (sha256 {found[:12]}... of"
            f" {weights}, {expected[:12]}... recorded): the file is corrupted or was changed. Download it again"
            f" (remove it from the Hugging Face cache) or export the model again.")
