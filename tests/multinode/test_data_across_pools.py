"""Ray Data reads on the data pool and its consumer runs on the training pool (resource-based placement)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq


def test_read_on_data_pool_consume_on_train_pool(multinode, tmp_path):
    import ray

    data_node = multinode.add_pool_node("data-cpu", num_cpus=2)
    train_node = multinode.add_pool_node("train-gpu-reserved", num_cpus=1)
    for i in range(4):
        pq.write_table(pa.table({"x": list(range(i * 100, (i + 1) * 100))}), tmp_path / f"part-{i}.parquet")

    def tag_node(batch):
        batch["read_node"] = [ray.get_runtime_context().get_node_id()] * len(batch["x"])
        return batch

    # Every read and transform task asks for a sliver of the data pool's resource: they can only run there.
    on_data_pool = {"resources": {"pool_data": 0.01}}
    ds = ray.data.read_parquet(str(tmp_path), **on_data_pool).map_batches(
        tag_node, batch_format="numpy", **on_data_pool
    )

    @ray.remote(num_cpus=1, resources={"pool_train": 0.01})
    class Consumer:
        def consume(self, ds) -> dict:
            rows, read_nodes = 0, set()
            for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
                rows += len(batch["x"])
                read_nodes.update(batch["read_node"].tolist())
            return {"rows": rows, "read_nodes": sorted(read_nodes), "node": ray.get_runtime_context().get_node_id()}

    consumer = Consumer.remote()
    try:
        out = ray.get(consumer.consume.remote(ds), timeout=120)
    finally:
        ray.kill(consumer)
    assert out["rows"] == 400
    assert out["read_nodes"] == [data_node.node_id], "reads must run on the data pool only"
    assert out["node"] == train_node.node_id, "the consumer must run on the training pool"
    # And the pool labels the cost collector prices by are what Ray reports for those nodes.
    labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes() if n["Alive"]}
    assert labels[data_node.node_id]["aifactory.io/pool"] == "data-cpu"
    assert labels[train_node.node_id]["aifactory.io/pool"] == "train-gpu-reserved"

