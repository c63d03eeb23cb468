"""Publishing to the Hugging Face Hub: ``push_to_hub`` (``push``, also the ``timm-ensembles-push`` command) and the
model card written from a run's own metrics (``card``). Loading is ``timm_ensembles.models.hub``."""
from .card import base_models, eval_results, generate_model_card, model_card_fields
from .push import push_to_hub

__all__ = ['push_to_hub', 'generate_model_card', 'model_card_fields', 'base_models', 'eval_results']
