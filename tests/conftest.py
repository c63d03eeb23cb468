import os

# tests never reach a network; fail fast instead of hanging on a download. Before any import of huggingface_hub (timm,
# timm_ensembles), which reads it once, at import
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pkgutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.data import resolve_data_config  # noqa: E402

import timm_ensembles  # noqa: E402
from timm_ensembles import methods  # noqa: E402
from timm_ensembles.files.model_folder import export_folder  # noqa: E402
from timm_ensembles.models import registry as _registry

# one torch thread per pytest-xdist worker: more threads than free cores makes CPU steps many times slower
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else min(2, os.cpu_count() or 1))

TINY_BASES = ('test_resnet', 'test_vit', 'test_efficientnet', 'test_convnext')
IMG = 32


def _registered_methods() -> dict[str, str]:
    """Every model family the package registers, by its generic timm name, with the module under
    timm_ensembles/methods that registers it: what each of those modules registers with timm, less the named variants
    of a generic name (``<method>_<base>x<N>``, ``<method>_<base>``)."""
    found = {}
    for module in pkgutil.iter_modules(methods.__path__):
        for name in timm.list_models(module=module.name):
            if _registry.parse_dynamic_name(name) is None:
                found[name] = module.name
    return found


# The one list of methods the generic model, task and export tests run over, found in the package (a new method
# module is covered without a test changing): fdl, ens, collab, ban (born-again students) and bane (their ensembles),
# meal, ensemble (of trained models). tests/methods/test_<module>.py holds each module's own tests.
METHOD_MODULES = _registered_methods()
METHODS = tuple(sorted(METHOD_MODULES))
# N members or heads of base_model (<method>_<base>x<N> names)
ENSEMBLE_METHODS = tuple(m for m in METHODS if m in _registry.list_ensemble_methods())
# one network of base_model, taught by teachers (<method>_<base> names)
STUDENT_METHODS = tuple(m for m in METHODS if m in _registry._student_methods)
# the others are built from trained models (members=[folders, ...]), not from a base model's name
MEMBER_METHODS = tuple(m for m in METHODS if m not in ENSEMBLE_METHODS + STUDENT_METHODS)
assert {*_registry.list_ensemble_methods(), *_registry._student_methods} <= set(METHODS), METHODS
assert set(METHOD_MODULES.values()) == {m.name for m in pkgutil.iter_modules(methods.__path__)}, METHOD_MODULES


def model_kwargs(base: str, **kwargs):
    """Arguments that build a tiny base for 32 px input (ViTs are built for their input size)."""
    if base.startswith('test_vit'):
        kwargs.setdefault('img_size', IMG)
    return kwargs


def export_member_models(base: str, folder: str | Path, num: int = 2, num_classes: int = 5) -> list[str]:
    """``num`` freshly initialised models of ``base``, each exported under ``folder`` with a 32 px data config, as
    trained ones would be: the members of an ensemble of trained models."""
    paths = []
    for i in range(num):
        model = timm.create_model(base, **model_kwargs(base, num_classes=num_classes))
        data_config = dict(resolve_data_config(model=model), input_size=(3, IMG, IMG))
        paths.append(str(export_folder(model, Path(folder) / f'member{i}', data_config=data_config)))
    return paths


def create_method_model(method: str, base: str = 'test_resnet', folder: str | Path | None = None, size: int = 2,
                        num_classes: int = 5, **kwargs) -> torch.nn.Module:
    """A tiny model of any registered method: ``size`` members (or heads) of ``base``, or a student of ``base``; for a
    method built from trained models, ``size`` models of ``base`` exported under a new folder in ``folder`` first."""
    if method in ENSEMBLE_METHODS:
        kwargs[_registry._size_args[method]] = size  # num_members, num_heads
    if method in ENSEMBLE_METHODS + STUDENT_METHODS:
        return timm.create_model(method, base_model=base, **model_kwargs(base, num_classes=num_classes, **kwargs))
    assert folder is not None, f'{method!r} is built from trained models: pass a folder for them'
    members = export_member_models(base, tempfile.mkdtemp(dir=folder), size, num_classes)
    return timm.create_model(method, members=members, **kwargs)


def method_reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model whose data config ``model`` takes: its base model, built alike; for an ensemble of trained models,
    its first member as it was loaded (with the data config it was saved with)."""
    if isinstance(model, timm_ensembles.ModelEnsemble):
        return model.members[0]
    return timm.create_model(model.base_model, **model_kwargs(model.base_model, num_classes=model.num_classes))


def create_method_task(model: torch.nn.Module, **task_args) -> torch.nn.Module:
    """The task of a model built by ``create_method_model``: a distillation task gets two teachers built here (tiny
    models of the student's classes, of its own architecture and another, fed its batches as they are); the task of
    an ensemble of trained models trains its members where the ensemble has no head to train."""
    task_cls = timm_ensembles.get_task_cls(model)
    if issubclass(task_cls, timm_ensembles.DistillationTask):
        bases = (model.base_model, 'test_convnext')
        task_args.setdefault('teachers', [
            timm.create_model(b, **model_kwargs(b, num_classes=model.num_classes)).eval() for b in bases])
    if issubclass(task_cls, timm_ensembles.ModelEnsembleTask) and model.head.fc is None:
        task_args.setdefault('train_members', True)
    return timm_ensembles.create_task(model, **task_args)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='module')
def one_torch_thread():
    """One torch thread for a module of many tiny passes (``pytestmark = pytest.mark.usefixtures(...)``): their
    tensors are too small for intra-op threads to gain anything, and on a CPU whose cores are busy with other jobs
    two threads wait on each other (a test_resnet pass ~20-30x slower than on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A user's own model, registered with timm as a user would: one convolution layer and a linear classifier, no
# normalisation layer (the FDL paper's MNIST network), with no forward_intermediates.
class _PlainConvNet(torch.nn.Module):
    def __init__(self, num_classes=10, in_chans=3, num_filters=8, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = num_filters * 16
        self.conv = torch.nn.Conv2d(in_chans, num_filters, 5, padding=2)
        self.fc = torch.nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return torch.nn.functional.adaptive_max_pool2d(self.conv(x).relu(), 4)

    def forward_head(self, x, pre_logits=False):
        x = x.flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.fc = torch.nn.Linear(self.num_features, num_classes)


def _register_plain_net():
    import sys

    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
    module = sys.modules[__name__]
    module.default_cfgs = generate_default_cfgs({'te_plain_net': dict(
        num_classes=10, mean=(0.5,), std=(0.5,), input_size=(1, 28, 28), first_conv='conv', classifier='fc')})

    def te_plain_net(pretrained=False, **kwargs):
        return build_model_with_cfg(_PlainConvNet, 'te_plain_net', pretrained, **kwargs)
    te_plain_net.__module__ = __name__
    register_model(te_plain_net)


_register_plain_net()
