"""The training loop: config → mesh, sharded model, TrainState, data iterator, checkpoints, metrics → steps.

* Global batch = train.batch_packs (B) packs stacked on a new leading axis, sharded over (data, fsdp). It is
  filled by S data shards (train.data_shards; unimedvl_jax/distributed.py DataShardLayout): shard s reads the
  records source[s::S] and fills rows [s·B/S, (s+1)·B/S). Each JAX process runs the iterators of the shards its
  addressable devices hold (disjoint records across processes), feeds only those rows, and the global array is
  assembled with jax.make_array_from_process_local_data. The batches depend on (S, B) only, so runs with
  different process counts but the same S train on the same data, and a checkpoint restores across them.
  Each shard's iterator yields B/S packs per train step and tags each pack with the stage of its train step;
  before each step every pack's `.stage` must equal StageSchedule.stage_at(step); a mismatch is an error.
* Multi-process (launch/, unimedvl_jax/distributed.py): process 0 writes the console, TensorBoard,
  metrics.jsonl, config.json and checkpoint metadata; every process writes its checkpoint array shards.
* Checkpoints (train/checkpointing.py): every train.checkpoint_every steps, on SIGTERM (finish the current step,
  save, wait for the async save, return normally → exit 0) and at the end. On start the latest checkpoint in
  <workdir>/checkpoints is restored (TrainState onto the current mesh, data iterator state) and training continues.
* Non-finite guard: the step skips non-finite updates and counts them; when consecutive_skipped reaches
  train.max_consecutive_nonfinite the loop stops with NonFiniteError naming the step and the loss terms.
* Metrics (train/metrics.py): per-step JSONL rows (incl. the record ids each pack consumed), clu-aggregated
  summaries every train.log_every steps to the console, TensorBoard and the JSONL.
* Steps are dispatched asynchronously; a step's metrics are fetched after the next step is dispatched (one step
  in flight), and always before a checkpoint is written.
* At the end (train.write_final): <workdir>/final/ params checkpoint for `unimedvl-export`.

Test-only hooks (documented in train/train_config.py): train.debug_poison_steps (NaN ce_weight in the batches of
those 1-based steps), train.debug_step_sleep_s (sleep after each step so tests can interrupt a run mid-way).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import jax
import numpy as np
from flax import nnx

from unimedvl_jax import distributed
from unimedvl_jax import sharding as shd
from unimedvl_jax.train import checkpointing
from unimedvl_jax.curriculum import StageSchedule
from unimedvl_jax.train.metrics import FlopModel, MetricsLogger
from unimedvl_jax.train.step import (compile_train_step, init_train_state, make_optimizer, make_tables,
                                     make_train_step, train_state_shardings)
from unimedvl_jax.train.train_config import total_steps

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


class StageMismatchError(RuntimeError):
    """The data pipeline built a pack for a different curriculum stage than the step's."""


@dataclasses.dataclass
class TrainResult:
    step: int                 # state step at exit
    finished: bool            # reached the total number of steps
    preempted: bool           # stopped by SIGTERM
    restored_from: int | None
    final_dir: str | None


class _SigtermFlag:
    """Sets `.requested` on SIGTERM (main thread only); restores the previous handler on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM: finishing the current step, then saving a checkpoint and exiting")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def ensure_dataset(data_cfg, console=print) -> None:
    """Build unimed-mini into data_cfg.data_dir when it is missing (process 0; others wait)."""
    from data_pipelines import tfds_builder

    path = tfds_builder.dataset_dir(data_cfg.data_dir, data_cfg.dataset)
    if not path.exists() and jax.process_index() == 0:
        if data_cfg.dataset != "unimed_mini":
            raise FileNotFoundError(f"{path}: dataset {data_cfg.dataset!r} is not built; build it with "
                                    f"`python -m data_pipelines.build --dataset manifest --manifest FILE "
                                    f"--data-dir {data_cfg.data_dir}`")
        from data_pipelines import build

        console(f"dataset {path} missing: building unimed-mini (python -m data_pipelines.build)")
        if build.main(["--dataset", "unimed-mini", "--data-dir", str(data_cfg.data_dir)]) != 0:
            raise RuntimeError("building unimed-mini failed")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dataset built")


def check_stage(pack_stage: int, step: int, schedule: StageSchedule, iterator_step=None) -> None:
    """Raise StageMismatchError unless a pack built for `pack_stage` belongs to train step `step` (0-based)."""
    want = schedule.stage_at(step)
    if int(pack_stage) != want:
        raise StageMismatchError(
            f"step {step}: the data pipeline built a pack for stage {int(pack_stage)} "
            f"({schedule.names[int(pack_stage)]}) but the curriculum puts step {step} in stage {want} "
            f"({schedule.names[want]})" + ("" if iterator_step is None else f"; data iterator step {iterator_step}"))


def stack_packs(packs):
    """(B_local, ...) numpy PackedBatch from a list of PackedBatches."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *packs)


def data_layout(tcfg, batch_rows: dict, batch_packs: int, data_item, ckpt_dir: str, restored_from):
    """This process's DataShardLayout: train.data_shards, else the checkpoint's, else the default; checked
    against the checkpoint (same B and S) and the process layout (whole shards per process)."""
    shards = int(tcfg.data_shards)
    if data_item is not None:
        saved_s, saved_b = int(data_item["data_shards"]), int(data_item["batch_packs"])
        if saved_b != batch_packs or (shards and shards != saved_s):
            raise ValueError(
                f"checkpoint {restored_from} in {ckpt_dir} was written with train.batch_packs={saved_b} and "
                f"{saved_s} data shard(s); this run has batch_packs={batch_packs}"
                + (f" and train.data_shards={shards}" if shards else "")
                + ": the data iterators' states cannot be mapped onto the new layout (keep batch_packs and set "
                  f"train.data_shards={saved_s} or 0)")
        shards = saved_s
    if not shards:
        shards = distributed.default_data_shards(batch_rows, batch_packs)
    return distributed.data_shard_layout(batch_rows, batch_packs, shards, jax.process_index())


def train(cfg, workdir: str, *, console=print) -> TrainResult:
    """Run (or continue) training of `cfg` in `workdir`; see the module docstring."""
    with _SigtermFlag() as sigterm:  # installed first: a SIGTERM during setup stops after the first step
        return _train(cfg, workdir, console, sigterm)


def _train(cfg, workdir: str, console, sigterm: _SigtermFlag) -> TrainResult:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    say = console if is_main else (lambda *_: None)
    tcfg = cfg.train
    schedule = StageSchedule.from_config(cfg.curriculum)
    steps_total = total_steps(cfg)
    max_bad = int(tcfg.max_consecutive_nonfinite)
    poison = {int(s) for s in tcfg.debug_poison_steps}
    sleep_s = float(tcfg.debug_step_sleep_s)

    # --- mesh, model, state -------------------------------------------------------------------------------
    mesh = shd.make_mesh(cfg.mesh.shape, dcn_shape=cfg.mesh.get("dcn_shape"))
    batch_packs = int(tcfg.batch_packs)
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_packs % data_ways:
        raise ValueError(f"train.batch_packs={batch_packs} must be divisible by data·fsdp={data_ways} (mesh "
                         f"{dict(mesh.shape)})")
    batch_sharding = shd.data_sharding(mesh)
    batch_rows = distributed.batch_rows_by_process(batch_sharding, batch_packs)
    say(f"mesh {dict(mesh.shape)} rules {cfg.mesh.rules!r} on {jax.device_count()} device(s), "
        f"{jax.process_count()} process(es); global batch {batch_packs} packs × {cfg.data.max_tokens} tokens")

    from unimedvl_jax.models.unimedvl import UniMedVL

    if tcfg.init_vae_from:
        from unimedvl_jax.train.vae_checkpoint import adopt_vae_config, install_vae

        adopt_vae_config(cfg.model, tcfg.init_vae_from)  # before config.json is written and the model built
    model = UniMedVL(cfg.model, rngs=nnx.Rngs(int(tcfg.seed)))
    if tcfg.init_vae_from:
        install_vae(model, tcfg.init_vae_from)
        say(f"installed the VAE of {tcfg.init_vae_from} (latent scale {cfg.model.vae.scale_factor:.4f}, "
            f"shift {cfg.model.vae.shift_factor:.4f})")
    shd.shard_model(model, cfg.mesh.rules, mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    param_shardings = shd.state_shardings(params, cfg.mesh.rules, mesh)
    tables = make_tables(cfg, params)
    tx = make_optimizer(cfg, tables)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    state_shardings = train_state_shardings(abstract_state, param_shardings, mesh)
    flops = FlopModel.from_params(params, cfg.model)
    if is_main:
        from clu import parameter_overview

        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        say(parameter_overview.get_parameter_overview(params.to_pure_dict(), include_stats=count <= 50_000_000))
        say(f"FLOP model: {flops}")

    ckpt = checkpointing.TrainCheckpointer(os.path.join(workdir, "checkpoints"), every=tcfg.checkpoint_every,
                                           keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing)
    restored_from = ckpt.latest_step()
    data_item = None
    if restored_from is not None:
        del params  # the checkpoint replaces them
        target = checkpointing.abstract_target(abstract_state, state_shardings)
        state, data_item = ckpt.restore(restored_from, target)
        if int(state.step) != restored_from:
            raise RuntimeError(f"checkpoint {restored_from} holds TrainState.step={int(state.step)}")
        say(f"restored checkpoint step {restored_from} from {ckpt.directory}")
    else:
        state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=state_shardings, donate_argnums=0)(params)
        del params

    # --- data ---------------------------------------------------------------------------------------------
    from data_pipelines.loader import get_tokenizer, make_sharded_iterator

    layout = data_layout(tcfg, batch_rows, batch_packs, data_item, ckpt.directory, restored_from)
    say(f"data: {layout.shards} shard(s) of {layout.rows_per_shard} pack(s) per step; process "
        f"{jax.process_index()} feeds shard(s) {list(layout.local_shards)} ({layout.local_rows} of "
        f"{batch_packs} packs)")
    ensure_dataset(cfg.data, console=say)
    if is_main:  # trains (and caches in workdir) the tokenizer once; the other processes then load it
        tokenizer = get_tokenizer(cfg.data, cfg.model, workdir=workdir)
    distributed.barrier("tokenizer")
    if not is_main:
        tokenizer = get_tokenizer(cfg.data, cfg.model, workdir=workdir)
    iterator = make_sharded_iterator(cfg, tokenizer, layout)
    if data_item is not None:
        iterator.set_state(data_item["states"])

    def step_with_counters(state, batch, key):
        new_state, metrics = step_fn(state, batch, key)
        return new_state, {**metrics, "skipped": new_state.skipped,
                           "consecutive_skipped": new_state.consecutive_skipped}

    step_fn = make_train_step(graphdef, rest, tx, tables, cfg)
    train_step = compile_train_step(step_with_counters, state_shardings, batch_sharding)
    key = jax.random.key(int(tcfg.seed))

    def next_batch(step: int):
        """Global batch of train step `step` (0-based) + per-pack host info."""
        packs, record_ids, rows, tokens, samples, pack_flops = [], [], [], 0, 0, 0.0
        for row, pack, info in iterator.next_step():  # this process's rows, in local-row order
            check_stage(pack.stage, step, schedule, iterator.step)
            packs.append(pack)
            rows.append(row)
            record_ids.append(list(info.record_ids))
            tokens += info.num_real_tokens
            samples += len(info.record_ids)
            pack_flops += flops.pack_flops(pack, info.sample_tokens)
        local = stack_packs(packs)
        if step + 1 in poison:  # TEST-ONLY hook (train.debug_poison_steps)
            local = local.replace(ce_weight=np.full_like(local.ce_weight, np.nan))
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local)
        info = dict(real_tokens=tokens, samples=samples, model_flops=pack_flops)
        if tcfg.log_record_ids:
            info["record_ids"] = record_ids
            if jax.process_count() > 1 or layout.shards > 1:
                info["pack_rows"] = rows
        return batch, info

    logger = MetricsLogger(workdir, log_every=tcfg.log_every, peak_flops=tcfg.peak_flops,
                           num_devices=jax.device_count(), process_count=jax.process_count(),
                           stage_names=schedule.names, console=say,
                           process_rows=bool(tcfg.log_record_ids) and jax.process_count() > 1)
    if is_main:  # the config of the latest (re)start
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))

    pending = None          # (step, device metrics, host info, dispatch time) of the last dispatched step
    last_done = [time.time()]

    def process(entry):
        """Fetch one step's metrics, log them, apply the non-finite guard."""
        step, metrics, info, dispatched = entry
        values = jax.device_get(metrics)
        now = time.time()
        step_time = now - max(last_done[0], dispatched)
        last_done[0] = now
        row = {"step": step, "stage": int(values["stage"]), "loss": float(values["loss"]),
               "ce": float(values["ce"]), "mse": float(values["mse"]), "grad_norm": float(values["grad_norm"]),
               "lr": float(values["lr"]), "finite": bool(values["finite"]), "skipped": int(values["skipped"]),
               "consecutive_skipped": int(values["consecutive_skipped"]), "n_ce": int(values["n_ce"]),
               "n_mse": int(values["n_mse"]), "step_time_s": step_time, **info}
        logger.log_step(row)
        if max_bad > 0 and row["consecutive_skipped"] >= max_bad:
            logger.summarise()
            raise NonFiniteError(
                f"step {step}: {row['consecutive_skipped']} consecutive non-finite steps "
                f"(train.max_consecutive_nonfinite={max_bad}); loss terms at step {step}: ce={row['ce']}, "
                f"mse={row['mse']}, loss={row['loss']}, grad_norm={row['grad_norm']}")

    step = int(state.step)
    preempted = False
    saved_at = restored_from
    say(f"training steps {step + 1}..{steps_total} (log every {tcfg.log_every}, checkpoint every "
        f"{tcfg.checkpoint_every}) in {workdir}")
    try:
        while step < steps_total:
            batch, info = next_batch(step)
            dispatched = time.time()
            state, metrics = train_step(state, batch, key)
            step += 1
            if pending is not None:
                process(pending)
            pending = (step, metrics, info, dispatched)
            if sleep_s:
                time.sleep(sleep_s)
            if ckpt.should_save(step) or sigterm.requested:
                process(pending)
                pending = None
                if ckpt.save(step, state, iterator.get_state(), batch_packs=batch_packs,
                             data_shards=layout.shards, force=True):
                    saved_at = step
            if sigterm.requested:
                preempted = True
                break
        if pending is not None:
            process(pending)
            pending = None
        logger.summarise()
        if saved_at != step and ckpt.save(step, state, iterator.get_state(), batch_packs=batch_packs,
                                          data_shards=layout.shards, force=True):
            saved_at = step
        ckpt.wait()
    except BaseException:
        ckpt.wait()  # let an in-flight (good) checkpoint commit before the error propagates
        raise
    finally:
        logger.close()
    if preempted:
        say(f"preempted: checkpoint at step {step} saved in {ckpt.directory}")
    ckpt.close()

    final_dir = None
    if step >= steps_total and not preempted and tcfg.write_final:
        final_dir = checkpointing.write_final(os.path.join(workdir, "final"), graphdef, rest, state, cfg.model)
        say(f"wrote export-ready params checkpoint {final_dir} (unimedvl-export --checkpoint {final_dir})")
    if is_main and step > 0:
        from unimedvl_jax.train.loss_plot import plot_loss_curves

        plot = plot_loss_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curves.png"),
                                schedule.names)
        say(f"loss curves: {plot}")
    return TrainResult(step=step, finished=step >= steps_total, preempted=preempted, restored_from=restored_from,
                       final_dir=final_dir)

