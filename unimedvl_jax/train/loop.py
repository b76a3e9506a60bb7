"""The training loop: config → mesh, sharded model, TrainState, data iterator, checkpoints, metrics → steps.

* Global batch = train.batch_packs (B) packs stacked on a new leading axis, sharded over (data, fsdp). It is
  filled by S data shards (train.data_shards; data_pipelines/data_shards.py DataShardLayout): shard s reads the
  records source[s::S] and fills rows [s·B/S, (s+1)·B/S). Each JAX process runs the iterators of the shards its
  addressable devices hold (disjoint records across processes), feeds only those rows, and the global array is
  assembled with jax.make_array_from_process_local_data. The batches depend on (S, B) only, so runs with
  different process counts but the same S train on the same data, and a checkpoint restores across them.
  Each shard's iterator yields B/S packs per train step and tags each pack with the stage of its train step;
  before each step every pack's `.stage` must equal StageSchedule.stage_at(step); a mismatch is an error.
* Multi-process (launch/, unimedvl_jax/distributed.py): process 0 writes the console, TensorBoard,
  metrics.jsonl, config.json and checkpoint metadata; every process writes its checkpoint array shards.
* Checkpoints (train/checkpointing.py): every train.checkpoint_every steps, on SIGTERM (finish the current step,
  save, wait for the async save, return normally → exit 0) and at the end. On start the newest intact checkpoint
  in <workdir>/checkpoints (or train.restore_step) is verified and restored (TrainState onto the current mesh, data
  iterator state) and training continues; a damaged one is moved aside (train.on_corrupt_checkpoint=fallback) or
  stops the run (=fail). Metrics rows of steps after the restored one move to metrics.abandoned.jsonl
  (train/metrics_history.py). A save that fails in the background stops the run by the next step with
  CheckpointSaveError; at start a warning says when the disk cannot hold the checkpoints the run will keep.
* Non-finite guard: the step skips non-finite updates and counts them; when consecutive_skipped reaches
  train.max_consecutive_nonfinite the loop stops with NonFiniteError naming the step and the loss terms.
* Metrics (train/metrics.py): per-step JSONL rows (incl. the record ids each pack consumed), clu-aggregated
  summaries every train.log_every steps to the console, TensorBoard and the JSONL.
* Steps are dispatched asynchronously; a step's metrics are fetched after the next step is dispatched (one step
  in flight), and always before a checkpoint is written.
* At the end (train.write_final): <workdir>/final/ params checkpoint for `unimedvl-export`.
* With several processes, a process whose `train` fails tells the others (distributed.leave_job), which then
  stop at once instead of waiting in a collective for it; a failed collective (what a dead peer looks like) first
  waits for the heartbeat watcher to name the lost process (distributed.py, exit status 6).

`train` runs five named stages, each a function with one job: prepare the data and tokenizer → build the model
and the train state's layout → restore (or initialise) the state → run the loop → finish (final/ params, loss
curves). Behaviour only tests need (poisoned batches, pauses between steps) is injected as TrainHooks, never
read from the config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

import jax
import numpy as np
from clu import parameter_overview
from flax import nnx

from data_pipelines.data_shards import DataShardLayout, batch_rows_by_process, choose_layout
from data_pipelines.loader import get_tokenizer, make_sharded_iterator
from data_pipelines.pipeline import ShardedPackIterator
from data_pipelines.prepare import ensure_dataset
from unimedvl_jax import distributed
from unimedvl_jax import sharding as shd
from unimedvl_jax.curriculum import StageSchedule
from unimedvl_jax.data_config import validate_stream_options
from unimedvl_jax.models.unimedvl import UniMedVL
from unimedvl_jax.packed_batch import PackedBatch
from unimedvl_jax.tokenizers import Tokenizer
from unimedvl_jax.train import checkpoint_faults, checkpointing, metrics_history
from unimedvl_jax.train.loss_plot import plot_loss_curves
from unimedvl_jax.train.metrics import FlopModel, MetricsLogger
from unimedvl_jax.train.step import (
    TrainState,
    TrainTables,
    compile_train_step,
    init_train_state,
    make_optimizer,
    make_tables,
    make_train_step,
    train_state_shardings,
)
from unimedvl_jax.train.train_config import total_steps
from unimedvl_jax.train.vae_checkpoint import adopt_vae_config, install_vae

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


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """Behaviour injected around the loop (tests use it; a production run passes none).

    on_batch(step, packs) may replace this process's host batch (numpy PackedBatch, leading axis = local packs) of
    0-based train step `step` before it is sharded; after_dispatch(step) runs once 1-based step `step` has been
    dispatched."""

    on_batch: Callable[[int, PackedBatch], PackedBatch] | None = None
    after_dispatch: Callable[[int], None] | None = None


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


@dataclasses.dataclass
class Run:
    """What every stage of one (re)start shares: the config, the workdir, this process's console."""

    cfg: object
    workdir: str
    say: Callable[[str], None]          # the console on process 0, silent elsewhere
    schedule: StageSchedule
    steps_total: int

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def batch_packs(self) -> int:
        return int(self.cfg.train.batch_packs)


@dataclasses.dataclass
class ModelSetup:
    """The model split into its static parts and parameters, and how the train state and batch are laid out."""

    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.NamedSharding
    graphdef: nnx.GraphDef
    rest: nnx.State                     # non-parameter state (the fixed position tables)
    params: nnx.State | None            # initial parameters, handed over to the train state by restore_or_initialise
    tx: object
    tables: TrainTables
    abstract_state: TrainState
    state_shardings: TrainState
    flops: FlopModel


@dataclasses.dataclass
class Start:
    """The state training continues from and the checkpoint manager it came through."""

    state: TrainState
    ckpt: checkpointing.TrainCheckpointer
    restored_from: int | None
    data_item: dict | None              # the restored data iterators' states and layout


@dataclasses.dataclass
class DataStream:
    """This process's data shards and their iterators."""

    layout: DataShardLayout
    iterator: ShardedPackIterator


def train(cfg, workdir: str, *, console=print, hooks: TrainHooks | None = None) -> TrainResult:
    """Run (or continue) training of `cfg` in `workdir`; see the module docstring."""
    with _SigtermFlag() as sigterm:  # installed first: a SIGTERM during setup stops after the first step
        try:
            run = new_run(cfg, workdir, console)
            tokenizer = prepare_data(run)
            setup = build_model_and_state(run)
            start = restore_or_initialise(run, setup)
            stream = open_data_stream(run, setup, start, tokenizer)
            state, preempted = run_loop(run, setup, start, stream, sigterm, hooks or TrainHooks())
            return finish(run, setup, start, state, preempted)
        except BaseException as e:
            _leave_job(e)
            raise


def _leave_job(error: BaseException) -> None:
    """With several processes: an error of the runtime (a failed collective or barrier is what a dead peer looks
    like) is first given the time to turn out to be a lost process (the heartbeat watcher then ends this process
    naming it); then the others are told this process fails."""
    chain, e = [], error
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, (jax.errors.JaxRuntimeError, TimeoutError)) for x in chain):
        distributed.await_lost_peer()
    distributed.leave_job(f"{type(error).__name__}: {error}", getattr(error, "exit_status", 1))


def new_run(cfg, workdir: str | None, console=print) -> Run:
    """The Run of `cfg`: `workdir` made absolute and created (None: no run directory, as for a compile report).
    Data stream settings are checked first, so a bad one ends the run before anything is built."""
    validate_stream_options(cfg.data)
    if workdir is not None:
        workdir = os.path.abspath(workdir)
        os.makedirs(workdir, exist_ok=True)
    say = console if jax.process_index() == 0 else (lambda *_: None)
    return Run(cfg, workdir or "", say, StageSchedule.from_config(cfg.curriculum), total_steps(cfg))


def prepare_data(run: Run) -> Tokenizer:
    """Build the dataset when missing; the tokenizer (trained once by process 0, cached in the workdir)."""
    ensure_dataset(run.cfg.data, console=run.say)
    if run.is_main:
        tokenizer = get_tokenizer(run.cfg.data, run.cfg.model, workdir=run.workdir)
    distributed.barrier("tokenizer")
    if not run.is_main:
        tokenizer = get_tokenizer(run.cfg.data, run.cfg.model, workdir=run.workdir)
    return tokenizer


def train_mesh(cfg, devices=None) -> jax.sharding.Mesh:
    """The mesh of cfg.mesh (shape, dcn_shape) over `devices` (default: every JAX device); train.batch_packs must
    split over its data·fsdp ways."""
    mesh = shd.make_mesh(cfg.mesh.shape, devices, dcn_shape=cfg.mesh.get("dcn_shape"))
    data_ways, packs = mesh.shape["data"] * mesh.shape["fsdp"], int(cfg.train.batch_packs)
    if packs % data_ways:
        raise ValueError(f"train.batch_packs={packs} must be divisible by data·fsdp={data_ways} (mesh "
                         f"{dict(mesh.shape)})")
    return mesh


def abstract_model(model_cfg):
    """(graphdef, params, rest) of UniMedVL(model_cfg) with no parameter allocated: params are ShapeDtypeStructs
    (nnx.eval_shape without eager sharding); rest (the non-parameter state: the fixed sin-cos position tables) is
    computed concretely as numpy arrays, because the step closes over it as constants."""
    build = lambda: UniMedVL(model_cfg, rngs=nnx.Rngs(0))  # noqa: E731
    with nnx.use_eager_sharding(False):
        graphdef, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
        # Only the tables leave this jit: XLA drops the parameter initialisers, nothing of their size is allocated.
        rest = jax.device_get(jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])())
    return graphdef, params, rest


def build_model_and_state(run: Run, *, devices=None, abstract: bool = False) -> ModelSetup:
    """The mesh, the sharded model (train.init_vae_from installed), the optimizer and the train state's layout.

    `devices`: the mesh's devices (default: every JAX device; unimedvl-compile passes a target topology's).
    `abstract`: build the layout only, with no parameter allocated (ModelSetup.params is then abstract; for
    lowering and compiling the step, unimedvl_jax/aot.py)."""
    cfg, tcfg, say = run.cfg, run.cfg.train, run.say
    mesh = train_mesh(cfg, devices)
    processes = len({d.process_index for d in mesh.devices.flat})
    say(f"mesh {dict(mesh.shape)} rules {cfg.mesh.rules!r} on {mesh.size} device(s), {processes} process(es); "
        f"global batch {run.batch_packs} packs × {cfg.data.max_tokens} tokens ({mesh.devices.flat[0].device_kind})")
    if tcfg.init_vae_from:
        adopt_vae_config(cfg.model, tcfg.init_vae_from)  # before config.json is written and the model built
    if abstract:
        graphdef, params, rest = abstract_model(cfg.model)
    else:
        model = UniMedVL(cfg.model, rngs=nnx.Rngs(int(tcfg.seed)))
        if tcfg.init_vae_from:
            install_vae(model, tcfg.init_vae_from)
            say(f"installed the VAE of {tcfg.init_vae_from} (latent scale {cfg.model.vae.scale_factor:.4f}, "
                f"shift {cfg.model.vae.shift_factor:.4f})")
        shd.shard_model(model, cfg.mesh.rules, mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tables = make_tables(cfg, params)
    tx = make_optimizer(cfg, tables)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    state_shardings = train_state_shardings(abstract_state, shd.state_shardings(params, cfg.mesh.rules, mesh), mesh)
    flops = FlopModel.from_params(params, cfg.model)
    if run.is_main:
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        if abstract:
            say(f"{count:,} parameters (abstract)")
        else:
            say(parameter_overview.get_parameter_overview(params.to_pure_dict(),
                                                          include_stats=count <= 50_000_000))
        say(f"FLOP model: {flops}")
    return ModelSetup(mesh, shd.data_sharding(mesh), graphdef, rest, params, tx, tables, abstract_state,
                      state_shardings, flops)


def restore_or_initialise(run: Run, setup: ModelSetup) -> Start:
    """The newest intact checkpoint of <workdir>/checkpoints (or train.restore_step) restored onto this mesh, else
    a fresh TrainState; the metrics history rewound to the step training continues from."""
    tcfg = run.cfg.train
    nbytes = checkpoint_faults.checkpoint_nbytes(setup.abstract_state)
    ckpt = checkpointing.TrainCheckpointer(os.path.join(run.workdir, "checkpoints"), every=tcfg.checkpoint_every,
                                           keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing,
                                           nbytes=nbytes)
    for name in ckpt.removed_partial:
        run.say(f"removed the partial checkpoint {os.path.join(ckpt.directory, name)} of an unfinished save")
    params, setup.params = setup.params, None  # the train state takes them over (or the checkpoint replaces them)
    step = int(tcfg.restore_step)
    restored = ckpt.restore_verified(checkpointing.abstract_target(setup.abstract_state, setup.state_shardings),
                                     step=None if step < 0 else step, on_corrupt=str(tcfg.on_corrupt_checkpoint))
    if restored is None:
        state = jax.jit(lambda p: init_train_state(p, setup.tx), out_shardings=setup.state_shardings,
                        donate_argnums=0)(params)
        start = Start(state, ckpt, None, None)
    else:
        del params
        for note in restored.notes:
            run.say(f"warning: {note}")
        run.say(f"restored checkpoint step {restored.step} from {ckpt.directory}")
        start = Start(restored.state, ckpt, restored.step, restored.data)
    note = metrics_history.rewind(run.workdir, start.restored_from or 0, jax.process_index())
    if note:
        run.say(note)
    _report_checkpoint_space(run, ckpt, nbytes, start.restored_from or 0)
    return start


def _report_checkpoint_space(run: Run, ckpt: checkpointing.TrainCheckpointer, nbytes: int, first: int) -> None:
    """One line: a checkpoint's size and the free space; a warning when the kept checkpoints will not fit."""
    tcfg = run.cfg.train
    every, keep = max(int(tcfg.checkpoint_every), 1), int(tcfg.keep_checkpoints)
    saves_left = len(range(first - first % every + every, run.steps_total + 1, every))
    saves_left += run.steps_total > first and run.steps_total % every != 0  # the final save
    run.say(f"checkpoints: up to {checkpoint_faults.human(nbytes)} each, keep {keep}; "
            f"{checkpoint_faults.human(checkpoint_faults.free_bytes(ckpt.directory))} free in {ckpt.directory}")
    warning = checkpoint_faults.space_warning(ckpt.directory, nbytes, keep=keep,
                                              existing=len(checkpoint_faults.committed_steps(ckpt.directory)),
                                              saves_left=int(saves_left))
    if warning:
        run.say(f"warning: {warning}")


def open_data_stream(run: Run, setup: ModelSetup, start: Start, tokenizer: Tokenizer) -> DataStream:
    """The iterators of this process's data shards, at the restored position (the checkpoint's layout kept)."""
    layout = choose_layout(batch_rows_by_process(setup.batch_sharding, run.batch_packs), run.batch_packs,
                           int(run.cfg.train.data_shards), jax.process_index(), saved=start.data_item,
                           restored=f"checkpoint {start.restored_from} in {start.ckpt.directory}")
    run.say(f"data: {layout.shards} shard(s) of {layout.rows_per_shard} pack(s) per step; process "
            f"{jax.process_index()} feeds shard(s) {list(layout.local_shards)} ({layout.local_rows} of "
            f"{run.batch_packs} packs)")
    iterator = make_sharded_iterator(run.cfg, tokenizer, layout)
    if start.data_item is not None:
        iterator.set_state(start.data_item["states"])
    return DataStream(layout, iterator)


class _StepFeeder:
    """Builds each global batch from the data stream, and logs each step's metrics (one step later)."""

    def __init__(self, run: Run, setup: ModelSetup, stream: DataStream, hooks: TrainHooks):
        tcfg = run.cfg.train
        self.run, self.setup, self.stream, self.hooks = run, setup, stream, hooks
        self.max_bad = int(tcfg.max_consecutive_nonfinite)
        self.logger = MetricsLogger(run.workdir, log_every=tcfg.log_every, peak_flops=tcfg.peak_flops,
                                    num_devices=jax.device_count(), process_count=jax.process_count(),
                                    stage_names=run.schedule.names, console=run.say,
                                    process_rows=bool(tcfg.log_record_ids) and jax.process_count() > 1)
        self.last_done = time.time()

    def next_batch(self, step: int):
        """Global batch of train step `step` (0-based) + per-pack host info."""
        iterator = self.stream.iterator
        packs, record_ids, rows, tokens, samples, pack_flops = [], [], [], 0, 0, 0.0
        for row, pack, info in iterator.next_step():  # this process's rows, in local-row order
            check_stage(pack.stage, step, self.run.schedule, iterator.step)
            packs.append(pack)
            rows.append(row)
            record_ids.append(list(info.record_ids))
            tokens += info.num_real_tokens
            samples += len(info.record_ids)
            pack_flops += self.setup.flops.pack_flops(pack, info.sample_tokens)
        local = stack_packs(packs)
        if self.hooks.on_batch is not None:
            local = self.hooks.on_batch(step, local)
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.setup.batch_sharding, x), local)
        info = dict(real_tokens=tokens, samples=samples, model_flops=pack_flops)
        if self.run.cfg.train.log_record_ids:
            info["record_ids"] = record_ids
            if jax.process_count() > 1 or self.stream.layout.shards > 1:
                info["pack_rows"] = rows
        return batch, info

    def record(self, entry) -> None:
        """Fetch one step's metrics, log them, apply the non-finite guard."""
        step, metrics, info, dispatched = entry
        values = jax.device_get(metrics)
        now = time.time()
        step_time = now - max(self.last_done, dispatched)
        self.last_done = now
        row = {"step": step, "stage": int(values["stage"]), "loss": float(values["loss"]),
               "ce": float(values["ce"]), "mse": float(values["mse"]), "grad_norm": float(values["grad_norm"]),
               "lr": float(values["lr"]), "finite": bool(values["finite"]), "skipped": int(values["skipped"]),
               "consecutive_skipped": int(values["consecutive_skipped"]), "n_ce": int(values["n_ce"]),
               "n_mse": int(values["n_mse"]), "step_time_s": step_time, **info}
        self.logger.log_step(row)
        if self.max_bad > 0 and row["consecutive_skipped"] >= self.max_bad:
            self.logger.summarise()
            raise NonFiniteError(
                f"step {step}: {row['consecutive_skipped']} consecutive non-finite steps "
                f"(train.max_consecutive_nonfinite={self.max_bad}); loss terms at step {step}: ce={row['ce']}, "
                f"mse={row['mse']}, loss={row['loss']}, grad_norm={row['grad_norm']}")


def compiled_train_step(run: Run, setup: ModelSetup):
    """The jitted train step (one compilation for every curriculum stage), with the skip counters as metrics:
    what run_loop calls, and what unimedvl-compile lowers for a target topology (aot.py)."""
    step_fn = make_train_step(setup.graphdef, setup.rest, setup.tx, setup.tables, run.cfg)

    def step_with_counters(state, batch, key):
        new_state, metrics = step_fn(state, batch, key)
        return new_state, {**metrics, "skipped": new_state.skipped,
                           "consecutive_skipped": new_state.consecutive_skipped}

    return compile_train_step(step_with_counters, setup.state_shardings, setup.batch_sharding)


def run_loop(run: Run, setup: ModelSetup, start: Start, stream: DataStream, sigterm: _SigtermFlag,
             hooks: TrainHooks) -> tuple[TrainState, bool]:
    """Steps from the start state to the end or to SIGTERM; checkpoints on schedule, on SIGTERM and at the end.

    Steps are dispatched asynchronously: a step's metrics are fetched after the next step is dispatched (one step
    in flight), and always before a checkpoint is written. Returns (the last state, whether preempted)."""
    ckpt, state = start.ckpt, start.state
    train_step = compiled_train_step(run, setup)
    feeder = _StepFeeder(run, setup, stream, hooks)
    key = jax.random.key(int(run.cfg.train.seed))
    if run.is_main:  # the config of the latest (re)start
        with open(os.path.join(run.workdir, "config.json"), "w") as f:
            f.write(run.cfg.to_json_best_effort(indent=2))

    def save(step: int) -> bool:
        return ckpt.save(step, state, stream.iterator.get_state(), batch_packs=run.batch_packs,
                         data_shards=stream.layout.shards, force=True)

    pending = None          # (step, device metrics, host info, dispatch time) of the last dispatched step
    step, preempted, saved_at = int(state.step), False, start.restored_from
    run.say(f"training steps {step + 1}..{run.steps_total} (log every {run.cfg.train.log_every}, checkpoint every "
            f"{run.cfg.train.checkpoint_every}) in {run.workdir}")
    try:
        while step < run.steps_total:
            ckpt.check()  # a background save that failed stops the run here
            batch, info = feeder.next_batch(step)
            dispatched = time.time()
            state, metrics = train_step(state, batch, key)
            step += 1
            if pending is not None:
                feeder.record(pending)
            pending = (step, metrics, info, dispatched)
            if hooks.after_dispatch is not None:
                hooks.after_dispatch(step)
            if ckpt.should_save(step) or sigterm.requested:
                feeder.record(pending)
                pending = None
                if save(step):
                    saved_at = step
            if sigterm.requested:
                preempted = True
                break
        if pending is not None:
            feeder.record(pending)
        feeder.logger.summarise()
        if saved_at != step and save(step):
            saved_at = step
        ckpt.wait()
    except checkpoint_faults.CheckpointSaveError:
        raise
    except BaseException:
        try:
            ckpt.wait()  # let an in-flight (good) checkpoint commit before the error propagates
        except checkpoint_faults.CheckpointSaveError as save_error:  # reported too, never swallowed
            run.say(f"warning: {save_error}")
        raise
    finally:
        feeder.logger.close()
    if preempted:
        run.say(f"preempted: checkpoint at step {step} saved in {ckpt.directory}")
    ckpt.close()
    return state, preempted


def finish(run: Run, setup: ModelSetup, start: Start, state: TrainState, preempted: bool) -> TrainResult:
    """The export-ready final/ params checkpoint (when training completed) and the loss-curve plot."""
    step = int(state.step)
    final_dir = None
    if step >= run.steps_total and not preempted and run.cfg.train.write_final:
        final_dir = checkpointing.write_final(os.path.join(run.workdir, "final"), setup.graphdef, setup.rest, state,
                                              run.cfg.model)
        run.say(f"wrote export-ready params checkpoint {final_dir} (unimedvl-export --checkpoint {final_dir})")
    if run.is_main and step > 0:
        plot = plot_loss_curves(os.path.join(run.workdir, "metrics.jsonl"),
                                os.path.join(run.workdir, "loss_curves.png"), run.schedule.names)
        run.say(f"loss curves: {plot}")
    return TrainResult(step=step, finished=step >= run.steps_total, preempted=preempted,
                       restored_from=start.restored_from, final_dir=final_dir)
