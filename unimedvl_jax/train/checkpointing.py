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

Faults (train/checkpoint_faults.py):
* On start, partial `<step>.orbax-checkpoint-tmp*` directories of unfinished saves are removed.
* restore_verified checks a checkpoint before training from it: every commit marker present, every array and the
  data item read back, TrainState.step equal to the directory's step. A damaged checkpoint is moved aside to
  `<step>.corrupt` and the next older one is tried (on_corrupt="fallback"), or the run stops with
  CheckpointRestoreError naming the first array whose read failed (on_corrupt="fail", or an explicit step).
* Saves run in the background: `check()` (called every step) raises CheckpointSaveError as soon as the save in
  flight has failed, `save()` and `wait()` raise it for the previous save; the error names the OS cause, the path,
  the checkpoint's size against the free space and the last intact checkpoint. orbax's per-thread error logs of a
  failed save are kept off the console and written to `<checkpoints>/save_error.log` (process k > 0:
  save_error.process<k>.log); those of a failed restore to `<checkpoints>/restore_error.<step>.log`.
<workdir>/final/  a params checkpoint (interop/params_checkpoint.py: config.json + params/ + ema/) that
           `unimedvl-export --checkpoint <workdir>/final` reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from unimedvl_jax.interop.params_checkpoint import save_params_checkpoint, weights_state
from unimedvl_jax.train import checkpoint_faults as faults
from unimedvl_jax.train.checkpoint_faults import CheckpointRestoreError, CheckpointSaveError


def abstract_target(abstract_state, shardings):
    """ShapeDtypeStructs of `abstract_state` (e.g. from jax.eval_shape) placed on `shardings` (same tree)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def allgather_json(value) -> list:
    """`value` (JSON-serialisable) of every process, in process order (all processes call it)."""
    if jax.process_count() == 1:
        return [value]
    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(b[:n]).decode()) for b, n in zip(blobs, sizes)]


def gather_data_states(local_states: dict) -> dict:
    """{shard: state} of every process's data shards (the local ones alone on a single process)."""
    merged = {}
    for states in allgather_json(dict(local_states)):  # a shard fed by several processes has equal states
        merged.update(states)
    return dict(sorted(merged.items(), key=lambda kv: int(kv[0])))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def normalize_data_item(data: dict) -> dict:
    """A checkpoint's data item as {"data_shards": S, "batch_packs": B, "states": {"s": state}}."""
    if "data_shards" in data:
        return data
    states = data["states"]  # older form: one state per process, process i = data shard i
    return {"data_shards": int(data["process_count"]), "batch_packs": int(data["batch_packs"]),
            "states": {str(i): st for i, st in enumerate(states)}}


@dataclasses.dataclass
class Restored:
    """A verified checkpoint restored by TrainCheckpointer.restore_verified."""

    step: int
    state: object
    data: dict                          # normalised data item (normalize_data_item)
    notes: list[str]                    # one line per checkpoint set aside on the way (for the console)


class TrainCheckpointer:
    """CheckpointManager of (state, data) items under <workdir>/checkpoints, with the fault handling of the module
    docstring. `nbytes`: the estimated size of one checkpoint (checkpoint_faults.checkpoint_nbytes), for errors."""

    def __init__(self, directory, *, every: int, keep: int, async_save: bool = True, nbytes: int = 0):
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = max(int(every), 1)
        self.nbytes = int(nbytes)
        self.removed_partial = []
        if jax.process_index() == 0:
            self.removed_partial = faults.remove_partial_saves(self.directory)
        _barrier("partial checkpoints removed")
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(int(every), 1), max_to_keep=int(keep),
                                               enable_async_checkpointing=bool(async_save), create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._noise = faults.OrbaxNoise().__enter__()
        self._in_flight: int | None = None   # step of the save running in the background
        self._failed: int | None = None      # step of a save that failed (already reported)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Every `every` steps (not orbax's default policy, which also saves the first step of a fresh run)."""
        return step % self.every == 0 and step not in self.manager.all_steps()

    # -- restore ---------------------------------------------------------------------------------------------
    def restore(self, step: int, target):
        """(TrainState on target's shardings, normalised data item: see normalize_data_item) of `step`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      data=ocp.args.JsonRestore()))
        return restored["state"], normalize_data_item(restored["data"])

    def _try_restore(self, step: int, target):
        """((state, data) or None, why `step` is not usable or None), agreed by every process."""
        restored, why = None, None
        missing = faults.missing_commit_markers(os.path.join(self.directory, str(step)))
        if missing:
            why = f"no commit marker {missing[0]} (its save never finished)"
        else:
            try:
                restored = self.restore(step, target)
                if int(restored[0].step) != step:
                    why = f"it holds TrainState.step={int(restored[0].step)}"
            except Exception as e:  # noqa: BLE001 - any read failure makes the checkpoint unusable
                why = faults.describe_restore_error(e)
                self._noise.settle()
                suffix = "" if jax.process_index() == 0 else f".process{jax.process_index()}"
                details = self._noise.dump(os.path.join(self.directory, f"restore_error.{step}{suffix}.log"), e)
                why += f" (details: {details})" if details else ""
        reasons = allgather_json(why)
        bad = [(i, r) for i, r in enumerate(reasons) if r is not None]
        if not bad:
            return restored, None
        i, why = bad[0]
        return None, why if jax.process_count() == 1 else f"process {i}: {why}"

    def _move_aside(self, step: int, suffix: str) -> str:
        path = os.path.join(self.directory, f"{step}.{suffix}")
        if jax.process_index() == 0:
            path = faults.move_aside(self.directory, step, suffix)
        path = allgather_json(path)[0]
        self.manager.reload()
        return path

    def restore_verified(self, target, *, step: int | None = None, on_corrupt: str = "fallback") -> Restored | None:
        """The newest checkpoint that passes verification (or `step`), restored onto `target`; None when the
        directory holds no checkpoint. Raises CheckpointRestoreError (see module docstring)."""
        if on_corrupt not in ("fallback", "fail"):
            raise ValueError(f"train.on_corrupt_checkpoint={on_corrupt!r}: choose 'fallback' or 'fail'")
        steps = faults.step_dirs(self.directory)
        if step is not None and step not in steps:
            raise CheckpointRestoreError(f"train.restore_step={step}: {self.directory} holds no checkpoint {step} "
                                         f"(checkpoints: {', '.join(map(str, steps)) or 'none'})")
        if not steps:
            return None
        notes, set_aside = [], []
        for candidate in ([step] if step is not None else steps[::-1]):
            restored, why = self._try_restore(candidate, target)
            if why is None:
                for bad, path, reason in set_aside:
                    notes.append(f"checkpoint {bad} is damaged ({reason}); moved it to {path} and restored "
                                 f"checkpoint {candidate} instead")
                if step is not None:
                    for newer in (s for s in steps if s > step):
                        path = self._move_aside(newer, "abandoned")
                        notes.append(f"train.restore_step={step}: moved the newer checkpoint {newer} to {path} "
                                     f"(training continues from step {step}; drop train.restore_step for later "
                                     f"restarts)")
                return Restored(candidate, restored[0], restored[1], notes)
            where = os.path.join(self.directory, str(candidate))
            if step is not None:
                raise CheckpointRestoreError(f"checkpoint {where} (train.restore_step={step}) is damaged: {why}")
            if on_corrupt == "fail":
                older = [s for s in steps if s < candidate]
                hint = (f"set train.on_corrupt_checkpoint=fallback to restore the newest intact one, or pick one "
                        f"with train.restore_step={older[-1]}" if older else "no older checkpoint exists")
                raise CheckpointRestoreError(f"checkpoint {where} is damaged: {why} "
                                             f"(train.on_corrupt_checkpoint=fail; {hint})")
            set_aside.append((candidate, self._move_aside(candidate, "corrupt"), why))
        listed = "; ".join(f"{bad} ({reason}) moved to {path}" for bad, path, reason in set_aside)
        raise CheckpointRestoreError(f"no intact checkpoint in {self.directory}: {listed}. Rerunning starts from "
                                     f"step 0; to retry one, rename it back to its step number")

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, state, data_states: dict, *, batch_packs: int, data_shards: int,
             force: bool = False) -> bool:
        """Start an (async) save of `state` and this process's data-shard states {shard: state} at `step`; True
        if one started. Every process calls it (collective). Raises CheckpointSaveError when this or the
        previous save failed."""
        if not force and not self.should_save(step):
            return False
        self.wait()
        if step in self.manager.all_steps():
            return False
        data = {"data_shards": int(data_shards), "batch_packs": int(batch_packs),
                "states": gather_data_states(data_states)}
        self._noise.background_error = None
        try:
            started = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                      data=ocp.args.JsonSave(data)), force=True)
        except Exception as e:  # noqa: BLE001 - the synchronous part failed (e.g. creating the directory)
            raise self._save_error(step, e) from e
        if started:
            self._in_flight = step
        return started

    def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
        self._failed = step
        self._noise.settle()
        name = "save_error.log" if jax.process_index() == 0 else f"save_error.process{jax.process_index()}.log"
        details = self._noise.dump(os.path.join(self.directory, name), e)
        last = max((s for s in faults.committed_steps(self.directory) if s != step), default=None)
        return CheckpointSaveError(faults.describe_save_error(e, step=step, directory=self.directory,
                                                              nbytes=self.nbytes, last_intact=last, details=details))

    def check(self) -> None:
        """Raise CheckpointSaveError if the save in flight has failed (never blocks)."""
        if self._in_flight is None:
            return
        if not self.manager.is_saving_in_progress():
            self.wait()
        elif self._noise.background_error is not None:  # failed here; orbax waits for the other processes
            step, self._in_flight = self._in_flight, None
            raise self._save_error(step, self._noise.background_error) from self._noise.background_error

    def wait(self) -> None:
        """Block until the save in flight has finished; CheckpointSaveError if it failed."""
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the background failure here
            raise self._save_error(step, e) from e

    def close(self) -> None:
        """Wait for the save in flight (CheckpointSaveError if it failed) and release orbax's threads."""
        try:
            self.wait()
            if self._failed is None:
                self.manager.close()
        finally:
            self._noise.__exit__()


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
