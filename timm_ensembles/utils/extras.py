"""Optional dependencies: the packages of an extra (``pip install 'timm-ensembles[analysis]'``), imported when used.

``import timm_ensembles`` and training need none of them; what needs one asks for it here, so that a missing package
is one message naming the package, what needed it and the extra that installs it, instead of a bare ImportError deep
in a report.
"""
import importlib
from types import ModuleType

# how the package itself is installed, for messages and model cards: from its source, the one way that works while it
# is on no package index, and that stays true once it is on one
INSTALL_FROM_SOURCE = ('from its source: `pip install .` in a checkout of its repository, or the wheel that'
                       ' `pip wheel --no-deps .` builds there')

# each extra of pyproject.toml and the import names of its packages
EXTRAS = {
    'analysis': ('matplotlib', 'torchmetrics'),
    'hub': ('datasets',),
    'export': ('onnx', 'onnxscript', 'onnxruntime'),
}


class MissingExtraError(ImportError):
    """A package of an optional extra is not installed; the message says which extra installs it."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (a package of one of :data:`EXTRAS`, or a module inside it).

    Args:
        module: Import name, e.g. ``'matplotlib.figure'``.
        needed_for: What needs it, for the message (e.g. "the report's plots").

    Raises:
        MissingExtraError: The package is not installed; the message names it and the extra.
    """
    package = module.split('.')[0]
    extra = next(name for name, packages in EXTRAS.items() if package in packages)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split('.')[0] != package:
            raise  # the package is there and one of its own dependencies is missing: its own message says which
        raise MissingExtraError(f"{needed_for} needs the package '{package}', which is not installed: pip install"
                                f" 'timm-ensembles[{extra}]'") from e
