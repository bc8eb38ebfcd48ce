"""scale: Occluded-image Contrastive Learning (OCL) for Vision Transformers, at cluster scale."""
__version__ = "0.1.0"
