"""Loading a registry model version (sha256-verified) and batched, KV-cached, prefix-cached decoding.

The weights are read once into memory, hashed, compared with the registry's digest and only then
deserialised from those same bytes, so a file swapped between the check and the load cannot slip through.

Batching: rows of one model call share a KV cache and decode in lockstep, which needs equal prompt lengths
(:class:`aifactory.models.gpt.GPT` takes one ``start_pos`` per call). :func:`group_by_length` splits a batch
into such groups; each row's prompt is prefilled on its own (reusing the prefix cache), copied into the
group's cache, and then every decode step runs once for the whole group.

Isolation: the rows of a batch are different tenants' requests, so what raises for one row (its seed, its
prefill, its sampling) ends that row alone, with a :class:`GenResult` whose ``error`` says why; the other
rows decode on. Only the group's shared forward pass can fail a whole group.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from aifactory.data.tokenizer import EOS
from aifactory.exceptions import IntegrityError
from aifactory.serve.cache import PrefixCache


@dataclass
class LoadedModel:
    name: str
    version: str
    sha256: str
    model: object  # aifactory.models.gpt.GPT
    seq_len: int
    load_s: float

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def load_version(registry_location: str, name: str, version: str | None) -> LoadedModel:
    """Load ``name:version`` (None = newest servable); IntegrityError if the bytes do not match the digest."""
    import torch

    from aifactory.home import filesystem
    from aifactory.exceptions import VariantRejected
    from aifactory.models.gpt import GPTConfig
    from aifactory.models.build import build_model
    from aifactory.models.quantized import load_state
    from aifactory.registry import ModelRegistry

    t0 = time.monotonic()
    registry = ModelRegistry(registry_location)
    mv = registry.verify_signature(registry.get(name, version))  # a re-labelled manifest never loads
    fs, path = filesystem(mv.weights_path)
    try:
        with fs.open_input_stream(path) as f:
            blob = f.read()
    except (FileNotFoundError, OSError):
        raise IntegrityError(mv.weights_path, mv.sha256, "<missing file>") from None
    actual = hashlib.sha256(blob).hexdigest()
    if actual != mv.sha256:
        raise IntegrityError(mv.weights_path, mv.sha256, actual)
    cfg = GPTConfig.model_validate(mv.model_config)
    variant = mv.manifest.get("variant")
    if variant and not mv.servable:
        raise VariantRejected(mv.ref, (variant.get("gate") or {}).get("reason", "it is not servable"))
    # A quantized variant's state dict only loads into the quantized module structure (aifactory.models.build).
    model = build_model(mv.model_config, variant)
    load_state(model, torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    return LoadedModel(mv.name, mv.version, mv.sha256, model, cfg.seq_len, time.monotonic() - t0)


@dataclass
class GenItem:
    tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    tenant: str = "-"
    slo_class: str = "interactive"  # "interactive" or "batch": the continuous engine admits interactive first


@dataclass
class GenResult:
    tokens: list[int]
    finish_reason: str  # "stop", "length", or "error" (then ``error`` says why)
    prefix_hit_tokens: int = 0
    version: str = ""
    timings: dict = field(default_factory=dict)
    error: str | None = None  # this row failed ("TypeName: message"); ``tokens`` holds what it decoded first


@dataclass
class GenDelta:
    """What one decode step added to one request: its new token ids and, on its last step, the result."""

    tokens: list[int]
    result: GenResult | None = None


def group_by_length(items: Sequence[GenItem]) -> list[list[int]]:
    """Indices of ``items`` grouped by prompt length (rows of a group decode together)."""
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(len(it.tokens), []).append(i)
    return list(groups.values())


class Decoder:
    """Generates for a batch of requests with one :class:`LoadedModel` and an optional prefix cache."""

    def __init__(self, loaded: LoadedModel, *, prefix_cache: PrefixCache | None = None):
        self.loaded = loaded
        self.prefix_cache = prefix_cache

    def generate(self, items: Sequence[GenItem]) -> list[GenResult]:
        """Each row's result, in order; a row that failed has ``error`` set and the others are unaffected."""
        out: list[GenResult | None] = [None] * len(items)
        for deltas in self.stream(items):
            for i, d in enumerate(deltas):
                if d is not None and d.result is not None:
                    out[i] = d.result
        return out  # type: ignore[return-value]

    def stream(self, items: Sequence[GenItem]) -> Iterator[list[GenDelta | None]]:
        """One list per decode step, aligned with ``items``: a row's new token (``None`` while another
        length group decodes or after the row finished); a row's last delta carries its :class:`GenResult`.

        The non-streamed :meth:`generate` consumes this too, so both paths decode identically."""
        import torch

        with torch.inference_mode():
            for group in group_by_length(items):
                for step in self._group_steps([items[i] for i in group]):
                    row: list[GenDelta | None] = [None] * len(items)
                    for i, d in zip(group, step):
                        row[i] = d
                    yield row

    def _prefill_row(self, tokens: list[int], cache, row: int, tenant: str) -> tuple[object, int]:
        """Fill ``cache[row]`` with the prompt's KV state; return the last position's logits and the hit size."""
        import torch

        model = self.loaded.model
        n = len(tokens)
        single = model.new_kv_cache(1, max_len=n)
        start = 0
        if self.prefix_cache is not None:
            hit = self.prefix_cache.lookup(self.loaded.version, tokens, tenant=tenant)
            if hit is not None:
                start, state = hit
                for layer, (k, v) in enumerate(state):
                    single.keys[layer][:, :, :start] = k
                    single.values[layer][:, :, :start] = v
        idx = torch.tensor([tokens[start:]], dtype=torch.long)
        logits = model(idx, kv_cache=single, start_pos=start)[:, -1]
        if self.prefix_cache is not None:
            for m in self.prefix_cache.candidate_lengths(n):
                if m <= start or (tenant, self.loaded.version, tokens[:m]) in self.prefix_cache:
                    continue
                state = [(single.keys[j][:, :, :m].clone(), single.values[j][:, :, :m].clone())
                         for j in range(len(single.keys))]
                self.prefix_cache.put(self.loaded.version, tokens[:m], state, tenant=tenant)
        for layer in range(len(cache.keys)):
            cache.keys[layer][row, :, :n] = single.keys[layer][0]
            cache.values[layer][row, :, :n] = single.values[layer][0]
        return logits[0], start

    def _group_steps(self, items: list[GenItem]) -> Iterator[list[GenDelta | None]]:
        """Decode one group of equal-length prompts in lockstep, yielding each step's deltas.

        A row whose own work raises ends in that step with ``error`` set; the shared forward pass keeps
        feeding it a placeholder token (rows never attend to each other, so the others decode unchanged)."""
        import torch

        model = self.loaded.model
        b = len(items)
        n = len(items[0].tokens)
        steps = max(it.max_tokens for it in items)
        total = min(n + steps, self.loaded.seq_len)
        cache = model.new_kv_cache(b, max_len=total)
        t0 = time.monotonic()
        generated: list[list[int]] = [[] for _ in items]
        done = [False] * b
        finish = ["length"] * b
        errors: list[str | None] = [None] * b

        def fail(r: int, err: Exception) -> None:
            done[r], finish[r], errors[r] = True, "error", f"{type(err).__name__}: {err}"

        gens: list = [None] * b
        last: list = [None] * b  # each row's logits at its last prompt position
        hits = [0] * b
        for r, it in enumerate(items):
            try:
                gens[r] = torch.Generator().manual_seed(it.seed) if it.seed is not None else None
                last[r], hits[r] = self._prefill_row(it.tokens, cache, r, it.tenant)
            except Exception as err:
                fail(r, err)
        t_prefill = time.monotonic() - t0
        ok = [x for x in last if x is not None]
        logits = torch.stack([x if x is not None else torch.zeros_like(ok[0]) for x in last]) if ok else None
        reported = [False] * b
        pos = n
        while True:
            new: list[list[int]] = [[] for _ in items]
            nxt = torch.zeros(b, dtype=torch.long)  # finished and failed rows feed a placeholder
            for r, it in enumerate(items):
                if done[r]:
                    continue
                try:
                    tok = _sample(logits[r], it.temperature, gens[r])
                except Exception as err:
                    fail(r, err)
                    continue
                nxt[r] = tok
                if tok == EOS:
                    done[r], finish[r] = True, "stop"
                else:
                    generated[r].append(tok)
                    new[r].append(tok)
                    if len(generated[r]) >= it.max_tokens:
                        done[r] = True
            ending = all(done) or pos >= total
            step: list[GenDelta | None] = []
            for r in range(b):
                if reported[r]:
                    step.append(None)
                elif done[r] or ending:
                    reported[r] = True
                    timing = {"prefill_s": t_prefill, "decode_s": time.monotonic() - t0 - t_prefill,
                              "batch_rows": b}
                    result = GenResult(generated[r], finish[r], prefix_hit_tokens=hits[r],
                                       version=self.loaded.version, timings=timing, error=errors[r])
                    step.append(GenDelta(new[r], result=result))
                else:
                    step.append(GenDelta(new[r]))
            yield step
            if ending:
                break
            logits = model(nxt[:, None], kv_cache=cache, start_pos=pos)[:, -1]
            pos += 1


def _sample(logits, temperature: float, generator) -> int:
    """The next token of one row: greedy at temperature 0, else drawn from ``softmax(logits / temperature)``."""
    import torch

    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
