"""Measuring a data feed against a fixed compute step: the machinery of benchmarks/data_feed.py.

Three feeds over the same shards: the Ray Data feed (:mod:`aifactory.data.feed`), a plain torch
``DataLoader`` over the same Parquet files (:class:`ParquetTokenStream`, the usual baseline), and
synthetic in-memory tensors (no I/O: the ceiling). :func:`measure` runs one feed for a number of steps,
with or without a fixed compute step (a tiny model's forward and backward), and reports rows/s and the
data-wait fraction from :class:`~aifactory.data.feed.WaitMeter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aifactory.data.feed import WaitMeter


def parquet_token_loader(files: list[str], *, batch_size: int, num_workers: int = 2, prefetch_factor: int = 2):
    """A torch DataLoader over token shards: workers split the files and yield ``(B, L) int64`` batches."""
    import torch.utils.data

    return torch.utils.data.DataLoader(ParquetTokenStream(files, batch_size=batch_size), batch_size=None,
                                       num_workers=num_workers, prefetch_factor=prefetch_factor if num_workers else None,
                                       persistent_workers=False)


try:
    import torch.utils.data as _tud

    _Base = _tud.IterableDataset
except ImportError:  # pragma: no cover - torch is a dependency; this keeps the module importable without it
    _Base = object


class ParquetTokenStream(_Base):
    def __init__(self, files: list[str], *, batch_size: int):
        self.files, self.batch_size = list(files), batch_size

    def __iter__(self) -> Iterator[Any]:
        import numpy as np
        import pyarrow.parquet as pq
        import torch

        info = torch.utils.data.get_worker_info()
        files = self.files if info is None else self.files[info.id :: info.num_workers]
        carry = None
        for path in files:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size):
                col = rb.column(0)
                rows = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
                if carry is not None:
                    rows = np.concatenate([carry, rows])
                    carry = None
                n = len(rows) // self.batch_size * self.batch_size
                for i in range(0, n, self.batch_size):
                    yield torch.from_numpy(rows[i : i + self.batch_size].astype(np.int64))
                if n < len(rows):
                    carry = rows[n:]


def timed(batches: Iterable[Any]) -> Iterator[tuple[Any, float]]:
    """``(batch, seconds waited)`` for any iterable, like :func:`~aifactory.data.feed.iter_token_batches`."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


def compute_step_fn(*, vocab_size: int = 259, d_model: int = 128, threads: int = 1) -> Callable[[Any], None]:
    """A fixed compute step: embedding + 2-layer MLP + LM head, forward, backward and SGD update."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab_size, d_model), torch.nn.Linear(d_model, 4 * d_model),
                                torch.nn.GELU(), torch.nn.Linear(4 * d_model, d_model), torch.nn.Linear(d_model, vocab_size))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(batch) -> None:
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def measure(batches: Iterable[tuple[Any, float]], *, steps: int, compute: Callable[[Any], None] | None) -> dict[str, float]:
    """Run ``steps`` steps (after one warm-up step that absorbs pipeline start-up); rows/s and wait fraction."""
    meter = WaitMeter(warmup_steps=1)
    rows = 0
    t0 = None
    for i, (batch, wait_s) in enumerate(batches):
        t = time.perf_counter()
        if compute is not None:
            compute(batch)
        meter.record(wait_s=wait_s, compute_s=time.perf_counter() - t)
        if i == 0:
            t0 = time.perf_counter()  # throughput excludes the warm-up step (pipeline start-up)
        else:
            rows += batch.shape[0]
        if i >= steps:
            break
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    s = meter.summary()
    return {"rows_per_s": rows / elapsed if elapsed > 0 else 0.0, "steps": s["steps"] - 1, "rows": rows,
            "data_wait_fraction": s["data_wait_fraction"], "median_wait_ms": s["median_wait_ms"],
            "p99_wait_ms": s["p99_wait_ms"], "startup_s": s["warmup_wait_s"], "seconds": elapsed}
