"""Publishing to the Hugging Face Hub: ``push_to_hub`` and its model card."""
