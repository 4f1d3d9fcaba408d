"""LanceDB side: table schemas (``store.schemas``), typed access (``Store``) and the model registry."""

from store.registry import CorruptArtifact, ModelRegistry, ModelVersion
from store.tables import Store

__all__ = ["CorruptArtifact", "ModelRegistry", "ModelVersion", "Store"]
