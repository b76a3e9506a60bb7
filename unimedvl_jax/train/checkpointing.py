"""Training checkpoints (orbax CheckpointManager) and the export-ready final params checkpoint.

<workdir>/checkpoints/<step>/  two items:
    state  the TrainState pytree (ocp.args.StandardSave). Restored with an abstract target whose
           ShapeDtypeStructs carry NamedShardings of the CURRENT mesh, so a checkpoint written on one mesh shape
           restores onto another (orbax reshards on read). The target is built here from jax.eval_shape +
           train_state_shardings, never from nnx.eval_shape (whose shardings hold an AbstractMesh that orbax
           rejects).
    data   the data iterators' JSON states (ocp.args.JsonSave): {"process_count": n, "batch_packs": B,
           "states": [state of process 0, ..., state of process n-1]}; with several processes the states are
           all-gathered first, since only the primary process writes JSON items.
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


def abstract_target(abstract_state, shardings):
    """ShapeDtypeStructs of `abstract_state` (e.g. from jax.eval_shape) placed on `shardings` (same tree)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def gather_data_states(local_state: dict) -> list[dict]:
    """Every process's iterator state, in process order (the local one alone on a single process)."""
    if jax.process_count() == 1:
        return [local_state]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(b[:n]).decode()) for b, n in zip(blobs, sizes)]


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

    def save(self, step: int, state, data_state: dict, *, batch_packs: int, force: bool = False) -> bool:
        """Start an (async) save of `state` and this process's iterator state at `step`; True if one started."""
        if not force and not self.should_save(step):
            return False
        if step in self.manager.all_steps():
            return False
        data = {"process_count": jax.process_count(), "batch_packs": int(batch_packs),
                "states": gather_data_states(data_state)}
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               data=ocp.args.JsonSave(data)), force=True)

    def restore(self, step: int, target, *, batch_packs: int):
        """(TrainState on target's shardings, this process's iterator state) of checkpoint `step`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      data=ocp.args.JsonRestore()))
        data = restored["data"]
        if int(data["process_count"]) != jax.process_count() or int(data["batch_packs"]) != int(batch_packs):
            raise ValueError(
                f"checkpoint {step} in {self.directory} was written by {data['process_count']} process(es) with "
                f"train.batch_packs={data['batch_packs']}; this run has {jax.process_count()} process(es) and "
                f"batch_packs={batch_packs}: the data iterators' states cannot be mapped onto the new layout")
        return restored["state"], data["states"][jax.process_index()]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_final(path, graphdef, rest, state, model_cfg) -> str:
    """Write the export-ready params checkpoint (config.json, params/, ema/) of a TrainState to `path`.

    Written to `<path>.tmp` and renamed, so `path` only ever holds a complete checkpoint (an older one is
    replaced)."""
    from unimedvl_jax.interop.params_checkpoint import save_params_checkpoint

    path = os.path.abspath(os.fspath(path))
    tmp = path + ".tmp"
    if jax.process_index() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    model = nnx.merge(graphdef, state.params, rest)
    ema_model = nnx.merge(graphdef, state.ema, rest)
    save_params_checkpoint(tmp, model, model_cfg, ema_model=ema_model)
    if jax.process_index() == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    return path
