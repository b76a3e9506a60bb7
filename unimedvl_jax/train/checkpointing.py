"""Training checkpoints (orbax CheckpointManager) and the export-ready final params checkpoint.

<workdir>/checkpoints/<step>/  two items:
    state  the TrainState pytree (ocp.args.StandardSave). Restored with an abstract target whose
           ShapeDtypeStructs carry NamedShardings of the CURRENT mesh, so a checkpoint written on one mesh shape
           restores onto another (orbax reshards on read). The target is built here from jax.eval_shape +
           train_state_shardings, never from nnx.eval_shape (whose shardings hold an AbstractMesh that orbax
           rejects).
    data   the data shards' iterator states (ocp.args.JsonSave): {"data_shards": S, "batch_packs": B,
           "states": {"0": state of data shard 0, ..., "S-1": ...}} (unimedvl_jax.distributed.DataShardLayout).
           With several processes the states are all-gathered first, since only the primary process writes
           JSON items. Data shards, not processes, are the unit: a checkpoint written by 2 processes restores
           in 1 process (or any layout whose processes feed whole shards). Checkpoints of the older
           {"process_count": n, "states": [...]} form read as n data shards.
Every process writes the array shards it holds (orbax: <step>/state/ocdbt.process_<i>/); the primary process
writes the metadata and the commit marker.
<workdir>/final/  a params checkpoint (interop/params_checkpoint.py: config.json + params/ + ema/) that
           `unimedvl-export --checkpoint <workdir>/final` reads.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from unimedvl_jax.interop.params_checkpoint import save_params_checkpoint, weights_state


def abstract_target(abstract_state, shardings):
    """ShapeDtypeStructs of `abstract_state` (e.g. from jax.eval_shape) placed on `shardings` (same tree)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def gather_data_states(local_states: dict) -> dict:
    """{shard: state} of every process's data shards (the local ones alone on a single process)."""
    if jax.process_count() == 1:
        return dict(local_states)

    blob = np.frombuffer(json.dumps(local_states).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    merged = {}
    for b, n in zip(blobs, sizes):  # a shard fed by several processes (replicated rows) has equal states
        merged.update(json.loads(bytes(b[:n]).decode()))
    return dict(sorted(merged.items(), key=lambda kv: int(kv[0])))


def normalize_data_item(data: dict) -> dict:
    """A checkpoint's data item as {"data_shards": S, "batch_packs": B, "states": {"s": state}}."""
    if "data_shards" in data:
        return data
    states = data["states"]  # older form: one state per process, process i = data shard i
    return {"data_shards": int(data["process_count"]), "batch_packs": int(data["batch_packs"]),
            "states": {str(i): st for i, st in enumerate(states)}}


class TrainCheckpointer:
    """CheckpointManager of (state, data) items under <workdir>/checkpoints."""

    def __init__(self, directory, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = max(int(every), 1)
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(int(every), 1), max_to_keep=int(keep),
                                               enable_async_checkpointing=bool(async_save), create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Every `every` steps (not orbax's default policy, which also saves the first step of a fresh run)."""
        return step % self.every == 0 and step not in self.manager.all_steps()

    def save(self, step: int, state, data_states: dict, *, batch_packs: int, data_shards: int,
             force: bool = False) -> bool:
        """Start an (async) save of `state` and this process's data-shard states {shard: state} at `step`; True
        if one started. Every process calls it (collective)."""
        if not force and not self.should_save(step):
            return False
        if step in self.manager.all_steps():
            return False
        data = {"data_shards": int(data_shards), "batch_packs": int(batch_packs),
                "states": gather_data_states(data_states)}
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               data=ocp.args.JsonSave(data)), force=True)

    def restore(self, step: int, target):
        """(TrainState on target's shardings, normalised data item: see normalize_data_item) of `step`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      data=ocp.args.JsonRestore()))
        return restored["state"], normalize_data_item(restored["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_final(path, graphdef, rest, state, model_cfg) -> str:
    """Write the export-ready params checkpoint (config.json, params/, ema/) of a TrainState to `path`.

    Written to `<path>.tmp` and renamed, so `path` only ever holds a complete checkpoint (an older one is
    replaced). Every process calls it: orbax writes each process's array shards, process 0 the rest."""
    path = os.path.abspath(os.fspath(path))
    tmp = path + ".tmp"
    main = jax.process_index() == 0
    if main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    model = nnx.merge(graphdef, state.params, rest)
    ema_model = nnx.merge(graphdef, state.ema, rest)
    if jax.process_count() == 1:
        save_params_checkpoint(tmp, model, model_cfg, ema_model=ema_model)
    else:  # same layout as save_params_checkpoint, with the directory and config written once
        if main:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(model_cfg.to_json_best_effort(indent=2))
        multihost_utils.sync_global_devices("final checkpoint directory")
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), weights_state(model))
        ckptr.save(os.path.join(tmp, "ema"), weights_state(ema_model))
        ckptr.wait_until_finished()
        multihost_utils.sync_global_devices("final checkpoint written")
    if main:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("final checkpoint renamed")
    return path
