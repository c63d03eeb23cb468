"""The only place this package reaches into timm's private modules, for names timm does not export publicly.

Checked against timm 1.0.31 (the version ``pyproject.toml`` requires at least; the test suite runs against the
installed one). Everything else comes from ``timm.models`` / ``timm.data``.
"""
from timm.models._features import FeatureGetterNet  # features_only through forward_intermediates
from timm.models._hub import generate_readme  # the model card timm writes for its own Hub models
from timm.models._input import _get_global_pool as get_global_pool  # a model's current pooling, read off its head

__all__ = ['FeatureGetterNet', 'generate_readme', 'get_global_pool']
