"""Helpers every layer of the package uses: atomic writes, argument checks, progress bars, optional extras, timm
compatibility."""
