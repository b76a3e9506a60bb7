"""The Grain input pipeline: shards → per-process share → shuffle → decode/validate/plan (worker processes) →
per-stage task mixture → packing into static-shape PackedBatches tagged with their curriculum stage.

* Each task family (understanding / generation / interleaved) is its own grain MapDataset; a stage's stream is
  `MapDataset.mix` of them with that stage's weights (unimedvl_jax/curriculum.py). The stage of batch k is the stage of
  train step `start_step + k`, so the mixture switches exactly at the stage boundary steps.
* Each JAX process reads a disjoint share (`source[index::count]`) before shuffling.
* Decoding, validation, image transforms, tokenisation and planning run in grain worker processes
  (`num_workers`); packing runs in the consuming process.
* Bad records are skipped, logged with their record id and counted by reason; the pipeline continues.
* State (`get_state` / `set_state`, JSON-serialisable) = the step, plus the stage stream's grain iterator state
  *before* the sample still waiting in the packer, so restoring re-reads that sample and resumes exactly.
  A sample waiting at a stage boundary belongs to the old stage's stream and is left there (that stream is
  finished); no sample inside a stage is lost.
"""

from __future__ import annotations

import collections
import copy
import logging

import grain
import numpy as np

from data_pipelines.bad_records import BadRecordCounter
from data_pipelines.packing import Packer
from data_pipelines.schema import BadRecord, Record
from data_pipelines.worker_prefetch import IN_PROCESS, StreamOptions, close_stream, prefetch_in_workers
from unimedvl_jax.curriculum import TASKS, StageSchedule

log = logging.getLogger(__name__)


def record_bytes(element) -> bytes:
    """The serialised record of a source element (a TFDS example dict or raw bytes)."""
    if isinstance(element, dict):
        value = element["record"]
    else:
        value = element
    return value.tobytes() if isinstance(value, np.ndarray) else bytes(value)


def source_records(source, *, name: str = "source"):
    """Every decodable Record of a random-access source, in order; undecodable ones are logged and skipped."""
    for i in range(len(source)):
        try:
            yield Record.from_bytes(record_bytes(source[i]), record_id=f"{name}[{i}]")
        except BadRecord as e:
            log.warning("skipping undecodable record: %s", e)


class IndexedSource:
    """A random-access view of `source` at `indices` (picklable when `source` is)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


def split_by_task(source) -> dict[str, IndexedSource]:
    """Per-task views of one source, using each element's 'task' field (decoding the record if absent)."""
    by_task = collections.defaultdict(list)
    for i in range(len(source)):
        element = source[i]
        task = element.get("task") if isinstance(element, dict) else None
        if task is None:
            task = Record.from_bytes(record_bytes(element), record_id=f"index {i}").task
        by_task[task.decode() if isinstance(task, bytes) else str(task)].append(i)
    unknown = set(by_task) - set(TASKS)
    if unknown:
        raise ValueError(f"source has records of unknown tasks {sorted(unknown)}")
    return {t: IndexedSource(source, idx) for t, idx in by_task.items()}


class DecodeAndPlan:
    """Worker-side transform: element → ('plan', task, SamplePlan) or ('bad', reason, record_id, detail)."""

    def __init__(self, planner):
        self.planner = planner

    def __call__(self, element, rng: np.random.Generator):
        record_id = element.get("id", b"?") if isinstance(element, dict) else "?"
        record_id = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
        try:
            record = Record.from_bytes(record_bytes(element), record_id=record_id).validate()
            return ("plan", record.task, self.planner(record, rng))
        except BadRecord as e:
            return ("bad", e.reason, e.record_id, e.detail)


class PackedBatchIterator:
    """Iterator of numpy PackedBatches with checkpointable state; `packs_per_step` packs per train step (the
    iterator's `step` counts packs, the curriculum stage follows the train step)."""

    def __init__(self, task_sources: dict, schedule: StageSchedule, planner, packer: Packer, *, seed: int = 0,
                 shard_index: int = 0, shard_count: int = 1, stream: StreamOptions = IN_PROCESS,
                 start_step: int = 0, packs_per_step: int = 1):
        missing = {t for w in schedule.weights for t, v in w.items() if v > 0} - set(task_sources)
        if missing:
            raise ValueError(f"the curriculum mixes {sorted(missing)} but no source provides them")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        if packs_per_step < 1:
            raise ValueError(f"packs_per_step must be >= 1, got {packs_per_step}")
        self.schedule, self.packer, self.seed = schedule, packer, seed
        self.packs_per_step = packs_per_step  # this process's packs per train step: stage = stage_at(step // it)
        self.stream_options = stream
        self.bad_records = BadRecordCounter()
        self.tasks_seen = collections.Counter()
        self.last_pack = None
        self.last_pack_tasks: list[str] = []
        self._planner = planner
        self._shares = {}
        for task in sorted(task_sources):
            share = grain.MapDataset.source(task_sources[task])[shard_index::shard_count]
            if len(share) == 0:
                raise ValueError(f"process {shard_index}/{shard_count} gets no {task} records")
            self._shares[task] = share
        self.step = start_step
        self._stage = None
        self._iterator = None
        self._pending_tasks: list[str] = []
        self._resume_state = None

    # -- streams -------------------------------------------------------------------------------------------
    def _task_dataset(self, task: str, stage: int):
        # Seeds differ per stage and task, so each stage starts a fresh shuffle instead of replaying the first
        # records of the previous stage.
        k = sorted(self._shares).index(task)
        seed = self.seed + 7919 * k + 1_000_003 * stage
        return self._shares[task].shuffle(seed=seed).repeat().random_map(DecodeAndPlan(self._planner),
                                                                          seed=seed + 104729)

    def _stage_iterator(self, stage: int):
        weights = self.schedule.weights[stage]
        tasks = [t for t in sorted(self._shares) if weights.get(t, 0) > 0]
        mixed = grain.MapDataset.mix([self._task_dataset(t, stage) for t in tasks], [weights[t] for t in tasks])
        return prefetch_in_workers(mixed, self.stream_options)

    def _enter_stage(self, stage: int, iterator_state=None):
        close_stream(self._iterator)  # the previous stage's stream is finished: stop its workers now
        self._stage, self._iterator = stage, self._stage_iterator(stage)
        if iterator_state is not None:
            self._iterator.set_state(copy.deepcopy(iterator_state))
        self.packer.discard_open()  # a sample waiting from the previous stage stays with that stage's stream
        self._pending_tasks = []
        self._resume_state = self._iterator.get_state()

    # -- iteration -----------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        stage = self.schedule.stage_at(self.step // self.packs_per_step)
        if stage != self._stage:
            self._enter_stage(stage)
        while True:
            before = self._iterator.get_state()
            item = next(self._iterator)
            if item[0] == "bad":
                self.bad_records.add(BadRecord(item[1], item[2], item[3]))
                continue
            _, task, plan = item
            rejected = self.packer.stats.rejected
            done = self.packer.add(plan)
            if self.packer.stats.rejected != rejected:
                continue
            if not done:
                self._pending_tasks.append(task)
                continue
            # `plan` did not fit: it opens the next pack, so the resume point is just before it.
            pack = done[0]
            self.last_pack, self.last_pack_tasks = pack, self._pending_tasks
            self.tasks_seen.update(self._pending_tasks)
            self._pending_tasks, self._resume_state = [task], before
            batch = pack.batch.replace(stage=np.asarray(stage, np.int32))
            self.step += 1
            return batch

    # -- checkpointing -------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """JSON-serialisable state: resume at `step`, re-reading the sample waiting in the packer."""
        return {"step": int(self.step), "stage": self._stage,
                "iterator": copy.deepcopy(self._resume_state)}

    def set_state(self, state: dict) -> None:
        """Restore a state from get_state (on a freshly built or a running iterator)."""
        self.step = int(state["step"])
        if state["stage"] is None:
            close_stream(self._iterator)
            self._stage, self._iterator = None, None
            return
        self._enter_stage(int(state["stage"]), state["iterator"])

    def stats(self) -> dict:
        """Counters: batches, samples per task, packer stats, bad records by reason."""
        return {"step": self.step, "tasks": dict(self.tasks_seen), "packer": dict(
            samples=self.packer.stats.samples, packs=self.packer.stats.packs, rejected=self.packer.stats.rejected,
            rejected_by_budget=dict(self.packer.stats.rejected_by_budget)), "bad_records": self.bad_records.as_dict()}


class ShardedPackIterator:
    """This process's data shards (data_shards.DataShardLayout): one PackedBatchIterator per shard, each reading
    its own disjoint share of the records and yielding `rows_per_shard` packs per train step.

    `next_step()` returns this process's packs of one train step in local-row order (shards ascending, each
    shard's packs in order) with each pack's PackInfo and global batch row. State = {shard: iterator state}."""

    def __init__(self, iterators: dict, rows_per_shard: int):
        self.iterators = {int(s): it for s, it in sorted(iterators.items())}
        self.rows_per_shard = int(rows_per_shard)

    @property
    def shards(self) -> tuple[int, ...]:
        return tuple(self.iterators)

    @property
    def step(self) -> int:
        """Packs taken from each shard so far (the shards advance together)."""
        return min(it.step for it in self.iterators.values())

    def next_step(self):
        """[(global row, pack, PackInfo of that pack)] of one train step, in local-row order."""
        out = []
        for shard, it in self.iterators.items():
            for k in range(self.rows_per_shard):
                pack = next(it)
                out.append((shard * self.rows_per_shard + k, pack, it.last_pack))
        return out

    def get_state(self) -> dict:
        return {str(s): it.get_state() for s, it in self.iterators.items()}

    def set_state(self, states: dict) -> None:
        for s, it in self.iterators.items():
            it.set_state(states[str(s)] if str(s) in states else states[s])
