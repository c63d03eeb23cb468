"""Ensemble models: the container, the builder and registry, the split layout, member strategies, pretrained configs
and loading from the Hugging Face Hub."""
