"""Feeding training from a dataset version with Ray Data, and measuring whether it keeps up.

Streaming mode (the default): :func:`read_split` validates the version's contract for the split (every
shard present, intact size, sha256, schema, row counts), then ``ray.data.read_parquet`` over its shards.
Hand the Dataset to ``TorchTrainer(datasets={"train": ds})``; each worker streams its share with
``ray.train.get_dataset_shard("train")`` and :func:`iter_token_batches`, which wraps
``iter_torch_batches`` (prefetching ``prefetch_batches`` batches in the background) and yields each
``(B, seq_len) int64`` batch with the seconds the step waited for it. :class:`WaitMeter` adds those waits
up against compute time: ``data_wait_fraction``.

Deterministic mode (resume, exact reruns): streaming splits hand blocks to whichever worker asks first, so
the order a worker sees varies from run to run. :func:`read_deterministic` instead gives rank ``r`` of
``world_size`` the files ``deterministic_files(...)`` picks: the split's shards permuted by ``(seed,
epoch)`` and dealt round-robin, read in that order with ``preserve_order`` (rows in file order). The same
version, seed, epoch, rank and world size give the same batches, row for row; a new epoch gives a new file
order. Each worker builds its own Dataset this way instead of calling ``get_dataset_shard``.

Remote storage: when the version lives at a URI and a ``cache_dir`` is given (or
``AIFACTORY_DATA_CACHE`` is set), shards are first staged on local disk (:mod:`aifactory.data.staging`).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aifactory.data.store import DatasetVersion, join
from aifactory.home import filesystem, is_uri

if TYPE_CHECKING:
    import ray.data
    import torch

CACHE_ENV = "AIFACTORY_DATA_CACHE"


def _paths(version: DatasetVersion, split: str, cache_dir: str | None) -> tuple[Any, list[str]]:
    """``(filesystem or None, paths)`` to read: staged local copies, or the shards where they are."""
    cache_dir = cache_dir or os.environ.get(CACHE_ENV)
    if cache_dir and is_uri(version.location):
        from aifactory.data.staging import stage_locally

        return None, stage_locally(version, split, cache_dir)
    fs, base = filesystem(version.location)
    return fs, [join(base, s.path) for s in version.manifest.shards_of(split)]


def read_split(version: DatasetVersion, split: str, *, checksum: bool = True, cache_dir: str | None = None,
               override_num_blocks: int | None = None) -> ray.data.Dataset:
    """A streaming Ray Dataset of the split's ``tokens`` rows, after checking the split's contract."""
    import ray.data

    version.files(split)  # unknown split -> NotFound
    version.validate(splits=[split], checksum=checksum)
    fs, paths = _paths(version, split, cache_dir)
    return ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=override_num_blocks or len(paths))


def deterministic_files(files: list[str], *, rank: int, world_size: int, seed: int, epoch: int) -> list[str]:
    """Rank ``rank``'s files for ``(seed, epoch)``: a seeded permutation dealt round-robin."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    order = list(files)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world_size]


def read_deterministic(version: DatasetVersion, split: str, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                       epoch: int = 0, checksum: bool = True, cache_dir: str | None = None) -> ray.data.Dataset:
    """This rank's files for ``(seed, epoch)``, in a fixed order; see the module docstring."""
    import ray.data

    version.files(split)
    version.validate(splits=[split], checksum=checksum)
    fs, paths = _paths(version, split, cache_dir)
    mine = deterministic_files(paths, rank=rank, world_size=world_size, seed=seed, epoch=epoch)
    if not mine:
        raise ValueError(f"split {split!r} of {version.version} has {len(paths)} shards, fewer than world_size={world_size}")
    ds = ray.data.read_parquet(mine, filesystem=fs, override_num_blocks=len(mine))
    ds.context.execution_options.preserve_order = True
    return ds


def iter_token_batches(
    source: Any, *, batch_size: int, prefetch_batches: int = 2, device: str = "cpu", drop_last: bool = True,
    local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, float]]:
    """``(tokens (B, seq_len) int64, seconds waited)`` per step from a Dataset or a DataIterator."""
    import torch

    batches = iter(source.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=prefetch_batches, dtypes=torch.int64, device=device,
        drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
    ))
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch["tokens"], time.perf_counter() - t0


class WaitMeter:
    """Per-step data-wait vs compute time.

    Either call :meth:`record` yourself, or wrap the batch iterator with :meth:`track`, which counts the
    time between handing out a batch and being asked for the next one as compute. The first
    ``warmup_steps`` steps (pipeline start-up: ~10 s inside Ray Train) are kept apart in ``warmup_wait_s``
    so they do not hide the steady state; ``data_wait_fraction`` is over the remaining steps.
    """

    def __init__(self, *, warmup_steps: int = 1):
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.warmup_wait_s = 0.0
        self.wait_s = 0.0
        self.compute_s = 0.0
        self.waits_s: list[float] = []

    def record(self, *, wait_s: float, compute_s: float) -> None:
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.warmup_wait_s += wait_s
            return
        self.wait_s += wait_s
        self.compute_s += compute_s
        self.waits_s.append(wait_s)

    def track(self, batches: Iterable[tuple[Any, float]]) -> Iterator[Any]:
        it = iter(batches)
        for batch, wait_s in it:
            t0 = time.perf_counter()
            yield batch
            self.record(wait_s=wait_s, compute_s=time.perf_counter() - t0)

    @property
    def data_wait_fraction(self) -> float:
        total = self.wait_s + self.compute_s
        return self.wait_s / total if total > 0 else 0.0

    def summary(self) -> dict[str, float]:
        waits = sorted(self.waits_s)
        return {
            "steps": self.steps,
            "data_wait_fraction": round(self.data_wait_fraction, 5),
            "wait_s": round(self.wait_s, 4),
            "compute_s": round(self.compute_s, 4),
            "warmup_wait_s": round(self.warmup_wait_s, 3),
            "median_wait_ms": round(1e3 * statistics.median(waits), 3) if waits else 0.0,
            "p99_wait_ms": round(1e3 * waits[min(len(waits) - 1, int(0.99 * len(waits)))], 3) if waits else 0.0,
        }
