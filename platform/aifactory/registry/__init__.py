"""The model registry: named, versioned, digested model weights with their provenance manifests."""

from aifactory.registry.store import ModelRegistry, ModelVersion, sha256_file

__all__ = ["ModelRegistry", "ModelVersion", "sha256_file"]
