"""data_pipelines/data_shards.py: which global batch rows each process feeds, which data shards fill them, and
which layout a restored run must keep."""

import collections

import pytest

from data_pipelines import data_shards


def test_data_shard_layout():
    two = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    assert data_shards.default_data_shards(two, 8) == 2
    assert data_shards.default_data_shards({0: tuple(range(8))}, 8) == 1
    lay = data_shards.data_shard_layout(two, 8, 2, 1)
    assert (lay.local_shards, lay.rows_per_shard, lay.local_rows) == ((1,), 4, 4)
    assert data_shards.data_shard_layout({0: tuple(range(8))}, 8, 2, 0).local_shards == (0, 1)  # 1 process, 2 shards
    assert data_shards.data_shard_layout(two, 8, 4, 0).local_shards == (0, 1)
    interleaved = {0: (0, 1, 4, 5), 1: (2, 3, 6, 7)}  # e.g. a TPU device order
    assert data_shards.default_data_shards(interleaved, 8) == 4
    assert data_shards.data_shard_layout(interleaved, 8, 4, 1).local_shards == (1, 3)
    with pytest.raises(ValueError, match=r"process 0 feeds global batch rows \[0, 1, 4, 5\], which are not whole "
                                         r"data shards of 4 rows .* use train.data_shards=4"):
        data_shards.data_shard_layout(interleaved, 8, 2, 0)
    with pytest.raises(ValueError, match=r"train.batch_packs=8 must be divisible by the number of data shards "
                                         r"\(train.data_shards=3\)"):
        data_shards.data_shard_layout(two, 8, 3, 0)


def test_batch_rows_by_process_follow_the_sharding():
    Device = collections.namedtuple("Device", "id process_index")

    class FakeSharding:  # 4 devices, 2 per process, batch of 8 split in 4
        def devices_indices_map(self, shape):
            devs = [Device(i, i // 2) for i in range(4)]
            return {d: (slice(2 * i, 2 * i + 2),) for i, d in enumerate(devs)}

    assert data_shards.batch_rows_by_process(FakeSharding(), 8) == {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}


def test_choose_layout_keeps_the_checkpoint_layout():
    two = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    assert data_shards.choose_layout(two, 8, 0, 1).shards == 2  # default: one shard per process
    assert data_shards.choose_layout(two, 8, 4, 0).local_shards == (0, 1)
    saved = {"data_shards": 4, "batch_packs": 8}
    assert data_shards.choose_layout(two, 8, 0, 0, saved=saved, restored="checkpoint 6").shards == 4
    with pytest.raises(ValueError, match=r"checkpoint 6 was written with train.batch_packs=8 and 4 data shard\(s\); "
                                         r"this run has batch_packs=8 and train.data_shards=2.*data_shards=4 or 0"):
        data_shards.choose_layout(two, 8, 2, 0, saved=saved, restored="checkpoint 6")
    with pytest.raises(ValueError, match=r"this run has batch_packs=4"):
        data_shards.choose_layout({0: (0, 1), 1: (2, 3)}, 4, 0, 0, saved=saved, restored="checkpoint 6")
