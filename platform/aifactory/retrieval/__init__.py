"""Retrieval over the factory's own embeddings: versioned vector indexes.

- ``model``: the identity of an embedding model (name, package version, dimension, sha256 of its files), so an
  index is only ever searched with vectors of the model that built it
- ``index``: a faiss index built from a batch-embedding version, published content-addressed and atomically
  (like a dataset version) with lineage to the embeddings and the model digest; loaded only after its digests check
- ``tiers``: what a request reads: a fixed ``snapshot`` index version, or a ``fresh`` tier of upserts over it
  whose entries carry an ingest time and TTL (never returned as fresh past it), logged durably, with a lag and SLA
- ``moderation``: a copilot's input and output policy: a word-boundary blocklist and a secret/PII detector; refusals
  are answers with reasons, and ``redact`` replaces every secret and PII span with a placeholder
- ``prompt``: the retrieved chunks numbered as citations in a template within the model's token budget (lowest-ranked
  dropped first), and an answer's ``[n]`` markers resolved to their sources
- ``requestlog``: the per-tenant request log (JSONL per UTC day, text stored only redacted, purged past retention,
  readable only by its own tenant)

Pure Python over faiss and pyarrow: nothing here imports Ray, Serve or torch.
"""
