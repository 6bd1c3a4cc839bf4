"""Caches of the completions app, each explicit about what it keys on and when it forgets.

- :class:`ExactCache`: answers of deterministic requests (temperature 0 or a fixed seed), keyed by
  ``(tenant, model version, request fields)``; TTL and LRU size bound.
- :class:`SemanticCache`: answers of deterministic requests by prompt similarity (cosine of embeddings
  >= threshold), searched only among entries of the same tenant, model version and sampling fields.
- :class:`PrefixCache`: model KV state of prompt prefixes (e.g. a shared system prompt), keyed by tenant,
  model version and the prefix's token ids, so a later prompt of the same tenant with the same prefix skips
  recomputing it. Per tenant because a hit is observable (a faster first token, the hit counters): a cache
  shared across tenants would let one tenant probe which prefixes another sent.

Keys always include the model version, so a new version never serves an old answer; tenants never see
each other's entries. Pure Python (numpy only in the semantic cache): unit-tested without Ray or torch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CacheStats:
    lookups: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def record(self, tenant: str, hit: bool) -> None:
        self.lookups[tenant] = self.lookups.get(tenant, 0) + 1
        if hit:
            self.hits[tenant] = self.hits.get(tenant, 0) + 1

    def hit_ratio(self, tenant: str | None = None) -> float:
        if tenant is None:
            n, h = sum(self.lookups.values()), sum(self.hits.values())
        else:
            n, h = self.lookups.get(tenant, 0), self.hits.get(tenant, 0)
        return h / n if n else 0.0


class ExactCache:
    def __init__(self, *, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self.stats = CacheStats()

    @staticmethod
    def key(tenant: str, model_version: str, **fields: Any) -> tuple:
        return (tenant, model_version, tuple(sorted((k, _freeze(v)) for k, v in fields.items())))

    def get(self, key: tuple) -> Any | None:
        tenant = key[0]
        item = self._data.get(key)
        if item is not None and self.clock() - item[0] > self.ttl_s:
            del self._data[key]
            item = None
        self.stats.record(tenant, item is not None)
        if item is None:
            return None
        self._data.move_to_end(key)
        return item[1]

    def put(self, key: tuple, value: Any) -> None:
        self._data[key] = (self.clock(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def entries(self, tenant: str | None = None) -> int:
        return len(self._data) if tenant is None else sum(1 for k in self._data if k[0] == tenant)

    def drop(self, tenant: str | None = None) -> int:
        """Forget every entry of ``tenant`` (all entries when ``None``); returns how many were dropped."""
        doomed = [k for k in self._data if tenant is None or k[0] == tenant]
        for k in doomed:
            del self._data[k]
        return len(doomed)


class SemanticCache:
    """Nearest-neighbour lookup over normalised embeddings, per (tenant, version, sampling fields) bucket."""

    def __init__(self, *, threshold: float, ttl_s: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        # entry id -> (scope, created, embedding, value); insertion order = LRU order
        self._entries: OrderedDict[int, tuple[tuple, float, Any, Any]] = OrderedDict()
        self._next_id = 0
        self.stats = CacheStats()

    @staticmethod
    def scope(tenant: str, model_version: str, **fields: Any) -> tuple:
        return (tenant, model_version, tuple(sorted((k, _freeze(v)) for k, v in fields.items())))

    def get(self, scope: tuple, embedding: Sequence[float]) -> tuple[Any, float] | None:
        """The value of the most similar live entry in ``scope`` if its similarity >= threshold."""
        import numpy as np

        q = _unit(np.asarray(embedding, dtype=np.float32))
        now = self.clock()
        best_id, best_sim = None, -1.0
        for eid, (sc, created, emb, _) in list(self._entries.items()):
            if now - created > self.ttl_s:
                del self._entries[eid]
                continue
            if sc != scope:
                continue
            sim = float(np.dot(q, emb))
            if sim > best_sim:
                best_id, best_sim = eid, sim
        hit = best_id is not None and best_sim >= self.threshold
        self.stats.record(scope[0], hit)
        if not hit:
            return None
        self._entries.move_to_end(best_id)
        return self._entries[best_id][3], best_sim

    def put(self, scope: tuple, embedding: Sequence[float], value: Any) -> None:
        import numpy as np

        self._entries[self._next_id] = (scope, self.clock(), _unit(np.asarray(embedding, dtype=np.float32)), value)
        self._next_id += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self, tenant: str | None = None) -> int:
        return len(self._entries) if tenant is None else sum(1 for e in self._entries.values() if e[0][0] == tenant)

    def drop(self, tenant: str | None = None) -> int:
        """Forget every entry of ``tenant`` (all entries when ``None``); returns how many were dropped."""
        doomed = [eid for eid, e in self._entries.items() if tenant is None or e[0][0] == tenant]
        for eid in doomed:
            del self._entries[eid]
        return len(doomed)


def flush_requests(seen: dict[str, str], wanted: dict[str, str]) -> list[str | None]:
    """Which tenants' response caches a new ``cache_flush`` user_config asks to forget.

    ``cache_flush`` maps a tenant (or ``"*"`` for every tenant) to an opaque token; the control API writes a
    new token to ask every replica to flush, through Serve's ``user_config`` (so all replicas see it,
    including ones that start later, which hold nothing yet). A token already ``seen`` asks for nothing.
    Returns tenant names, ``None`` standing for "all".
    """
    return [None if t == "*" else t for t, token in sorted(wanted.items()) if seen.get(t) != token]


class PrefixCache:
    """KV state of prompt prefixes, at multiples of ``block_tokens``; the longest cached prefix wins.

    Values are opaque (the engine stores its KV tensors); ``lookup`` returns ``(n_tokens, state)`` of the
    longest cached prefix of ``tokens`` that is strictly shorter than ``tokens`` (the last token is always
    recomputed, since its logits start the generation). Every entry belongs to one tenant: a lookup never
    finds another tenant's prefix.
    """

    def __init__(self, *, max_entries: int, block_tokens: int):
        self.max_entries = max_entries
        self.block_tokens = block_tokens
        self._data: OrderedDict[tuple, Any] = OrderedDict()
        self.stats = CacheStats()

    def candidate_lengths(self, n_tokens: int) -> list[int]:
        """Prefix lengths worth caching for a prompt of ``n_tokens``, longest first."""
        top = (n_tokens - 1) // self.block_tokens * self.block_tokens
        return list(range(top, 0, -self.block_tokens))

    def lookup(self, model_version: str, tokens: Sequence[int], *, tenant: str) -> tuple[int, Any] | None:
        for n in self.candidate_lengths(len(tokens)):
            key = (tenant, model_version, tuple(tokens[:n]))
            if key in self._data:
                self._data.move_to_end(key)
                self.stats.record(tenant, True)
                return n, self._data[key]
        self.stats.record(tenant, False)
        return None

    def put(self, model_version: str, tokens: Sequence[int], state: Any, *, tenant: str) -> None:
        key = (tenant, model_version, tuple(tokens))
        self._data[key] = state
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __contains__(self, item: tuple[str, str, Sequence[int]]) -> bool:
        """``(tenant, model_version, tokens) in cache``."""
        return (item[0], item[1], tuple(item[2])) in self._data

    def __len__(self) -> int:
        return len(self._data)


def _freeze(v: Any) -> Hashable:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _unit(v):
    import numpy as np

    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v
