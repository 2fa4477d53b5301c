"""Flax (linen) models: the ViT encoder and the JEPA predictor."""
