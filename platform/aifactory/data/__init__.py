"""The data plane: byte tokenizer, packing, the versioned dataset store with contracts, the Ray Data feed,
and offline batch inference.

Modules: ``tokenizer``, ``packing``, ``manifest`` (the manifest and its contract), ``contract`` (checks),
``store`` (versions, atomic publish), ``ingest``, ``feed`` (Ray Data -> Ray Train), ``staging`` (local
cache of remote shards), ``embed`` (batch embeddings), ``stage`` (the ``factory run`` stage). Importing
this package is light; Ray and torch load inside the functions that need them.
"""
