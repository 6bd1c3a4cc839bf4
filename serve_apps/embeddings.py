"""Sentence embeddings with the pretrained MiniLM (all-MiniLM-L6-v2), OpenAI-compatible POST /v1/embeddings.

    HF_HUB_OFFLINE=1 serve run serve_apps.embeddings:app_builder
    serve deploy serve_apps/embeddings.yaml

Encode calls are batched with @serve.batch (batching.max_batch_size / batching.batch_wait_timeout_s).
"""

from aifactory.serve.apps.embeddings import app_builder
from aifactory.serve.config import EmbeddingsArgs

__all__ = ["EmbeddingsArgs", "app_builder"]
