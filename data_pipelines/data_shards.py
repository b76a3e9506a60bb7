"""Per-host data: which rows of the global batch each process feeds, and which data shards fill them.

The global batch of B packs is filled by S data shards (train.data_shards): shard s reads records source[s::S] and
fills rows [s·B/S, (s+1)·B/S). Each JAX process runs the iterators of the shards its addressable devices hold.
The batches depend on (S, B) only, never on the process count or the mesh, so a checkpoint restores across them.
"""

from __future__ import annotations

import dataclasses
import math


def batch_rows_by_process(sharding, batch: int) -> dict[int, tuple[int, ...]]:
    """{process index: sorted global batch rows held by that process's devices} for a (batch, ...) sharding.

    jax.make_array_from_process_local_data takes a process's rows in exactly this order (the sorted union of its
    devices' slices), so local data is the concatenation of these rows."""
    rows: dict[int, set] = {}
    for device, index in sharding.devices_indices_map((batch,)).items():
        sl = index[0]
        start, stop, _ = sl.indices(batch)
        rows.setdefault(device.process_index, set()).update(range(start, stop))
    return {p: tuple(sorted(r)) for p, r in sorted(rows.items())}


@dataclasses.dataclass(frozen=True)
class DataShardLayout:
    """The global batch of `batch` packs split into `shards` data shards of `rows_per_shard` consecutive rows.

    Data shard s reads records source[s::shards] and fills rows [s·rows_per_shard, (s+1)·rows_per_shard) of
    every global batch. The records a row receives depend only on (shards, batch), never on the number of
    processes or the mesh: a run on 1 process × 8 devices and one on 2 processes × 4 devices with the same
    `shards` train on the same batches, and a checkpoint restores onto either."""

    batch: int
    shards: int
    local_shards: tuple[int, ...]      # this process's shards, in local-row order
    rows_by_process: dict

    @property
    def rows_per_shard(self) -> int:
        return self.batch // self.shards

    @property
    def local_rows(self) -> int:
        return self.rows_per_shard * len(self.local_shards)


def default_data_shards(rows_by_process: dict, batch: int) -> int:
    """Fewest shards such that every process feeds whole shards (= process count for the usual device order)."""
    block = batch
    for rows in rows_by_process.values():
        prev = None
        for r in rows:
            if r != prev:  # the start of a run of consecutive rows
                block = math.gcd(block, r)
            prev = r + 1
            if r + 1 not in rows:
                block = math.gcd(block, r + 1)
    return batch // block


def data_shard_layout(rows_by_process: dict, batch: int, shards: int, process_index: int) -> DataShardLayout:
    """Check that every process feeds whole data shards and return this process's layout (clear errors)."""
    if shards < 1 or batch % shards:
        raise ValueError(f"train.batch_packs={batch} must be divisible by the number of data shards "
                         f"(train.data_shards={shards})")
    per = batch // shards
    owned = {}
    for p, rows in rows_by_process.items():
        mine = sorted({r // per for r in rows})
        if set(rows) != {r for s in mine for r in range(s * per, (s + 1) * per)}:
            raise ValueError(
                f"process {p} feeds global batch rows {list(rows)}, which are not whole data shards of {per} rows "
                f"(train.batch_packs={batch} / train.data_shards={shards}); with this mesh and process layout "
                f"use train.data_shards={default_data_shards(rows_by_process, batch)} (or a multiple that divides "
                f"the batch)")
        owned[p] = tuple(mine)
    return DataShardLayout(batch=batch, shards=shards, local_shards=owned[process_index],
                           rows_by_process=dict(rows_by_process))


def choose_layout(rows_by_process: dict, batch: int, configured_shards: int, process_index: int, *,
                  saved: dict | None = None, restored: str = "the checkpoint") -> DataShardLayout:
    """This process's layout: train.data_shards (`configured_shards`, 0 = automatic), else the restored
    checkpoint's (`saved` = its {"data_shards", "batch_packs"}), else the fewest whole shards per process.

    A restored run must keep the checkpoint's batch and shard count: each shard's iterator state is saved."""
    shards = int(configured_shards)
    if saved is not None:
        saved_s, saved_b = int(saved["data_shards"]), int(saved["batch_packs"])
        if saved_b != batch or (shards and shards != saved_s):
            raise ValueError(
                f"{restored} was written with train.batch_packs={saved_b} and {saved_s} data shard(s); this run "
                f"has batch_packs={batch}" + (f" and train.data_shards={shards}" if shards else "")
                + ": the data iterators' states cannot be mapped onto the new layout (keep batch_packs and set "
                  f"train.data_shards={saved_s} or 0)")
        shards = saved_s
    if not shards:
        shards = default_data_shards(rows_by_process, batch)
    return data_shard_layout(rows_by_process, batch, shards, process_index)
