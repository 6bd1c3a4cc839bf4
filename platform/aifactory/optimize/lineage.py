"""Variants under their parents: ordering registry versions as a lineage tree (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def variant_tree(versions: Sequence[Any]) -> list[tuple[int, Any]]:
    """``(depth, version)`` pairs: each version followed by its variants (manifest ``parent`` = ``name:version``).

    Versions whose parent is not in ``versions`` (or which have none) are roots, in their given order.
    """
    # A parent is named within the variant's own tenant namespace (aifactory.registry.store).
    key = lambda mv: (getattr(mv, "tenant", ""), f"{mv.name}:{mv.version}")  # noqa: E731
    refs = {key(mv): mv for mv in versions}
    children: dict[tuple[str, str], list[Any]] = {}
    roots = []
    for mv in versions:
        parent = (getattr(mv, "tenant", ""), (mv.manifest or {}).get("parent"))
        if parent in refs and parent != key(mv):
            children.setdefault(parent, []).append(mv)
        else:
            roots.append(mv)
    out: list[tuple[int, Any]] = []
    seen: set[tuple[str, str]] = set()

    def walk(mv, depth: int) -> None:
        ref = key(mv)
        if ref in seen:  # a cycle in hand-edited manifests must not loop forever
            return
        seen.add(ref)
        out.append((depth, mv))
        for child in children.get(ref, []):
            walk(child, depth + 1)

    for mv in roots:
        walk(mv, 0)
    return out


def variant_label(manifest: dict[str, Any]) -> str | None:
    """``"int8-dynamic"``, ``"distill"``, ... or None for a model that is not a variant."""
    v = manifest.get("variant") if manifest else None
    return v.get("method") if isinstance(v, dict) else None
