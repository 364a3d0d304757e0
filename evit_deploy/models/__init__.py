"""The EfficientViT family: architecture, checkpoints, BN folding and counting."""

from .registry import MODELS, ModelSpec, list_models, resolve_name

__all__ = ["MODELS", "ModelSpec", "list_models", "resolve_name", "create_model", "load_model", "build_model", "fuse"]


def __getattr__(name):
    # torch is imported on first use, so that name lookups stay torch-free.
    if name in ("create_model", "load_model", "build_model"):
        from . import factory
        return getattr(factory, name)
    if name == "fuse":
        from .fuse import fuse
        return fuse
    raise AttributeError(name)
