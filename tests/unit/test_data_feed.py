"""Feed helpers without Ray: WaitMeter accounting and the DataLoader baseline over real shards."""

from __future__ import annotations

import time

import torch

from aifactory.data.feed import WaitMeter
from aifactory.data.feedbench import measure, parquet_token_loader, timed
from aifactory.data.ingest import IngestConfig, ingest, local_writer
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef
from tests.unit.test_data_store import write_corpus


def test_wait_meter_separates_warmup_wait_and_compute():
    def slow_source():
        for i in range(4):
            yield i, (0.5 if i == 0 else 0.01)  # (batch, seconds waited): a slow first batch

    meter = WaitMeter(warmup_steps=1)
    for _ in meter.track(slow_source()):
        time.sleep(0.03)
    s = meter.summary()
    assert s["steps"] == 4 and s["warmup_wait_s"] == 0.5
    assert abs(meter.wait_s - 0.03) < 1e-9 and meter.compute_s >= 0.09
    assert 0.0 < meter.data_wait_fraction < 0.26  # 0.03 / (0.03 + >= 0.09)
    empty = WaitMeter()
    assert empty.data_wait_fraction == 0.0


def test_dataloader_baseline_reads_every_full_batch_of_the_shards(tmp_path):
    home = FactoryHome.from_env(tmp_path / "h").ensure()
    v = ingest(home, IngestConfig(source=str(write_corpus(tmp_path / "c")), seq_len=32, target_shard_mb=0.002),
               tenant=TenantRef(tenant="t"), writer=local_writer).dataset
    files = v.files("train")
    assert len(files) > 2
    batches = list(parquet_token_loader(files, batch_size=16, num_workers=0))
    assert all(b.shape == (16, 32) and b.dtype == torch.int64 for b in batches)
    assert len(batches) == v.manifest.splits["train"].rows // 16  # rows carry across shard boundaries
    stats = measure(timed(iter(batches)), steps=5, compute=lambda b: time.sleep(0.005))
    assert stats["steps"] == 5 and stats["rows"] == 5 * 16 and stats["rows_per_s"] > 0
    assert stats["data_wait_fraction"] < 0.5  # in-memory batches barely wait
