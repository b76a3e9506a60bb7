"""Streaming a UniMedVL mixture (data_pipelines/mixture.py) straight from its JSONL / parquet files into packed
batches, with the mixture's mandatory groups and weights (docs/unimedvl_format.md "Streaming and mixing").

Per group: this process's share of the group's selected lines (source[index::count]) -> shuffle (seeded per group
from data.seed) -> repeat -> read + plan in grain (worker processes with num_workers > 0). Per pack:

1. one sample of every mandatory group, in YAML order (one that does not fit beside the earlier ones is rejected,
   counted, and the group's next sample is tried);
2. the sample left over from the previous pack (rejected and counted if it no longer fits beside them);
3. groups drawn with probability proportional to weight (draw n of the run uses an rng seeded by (seed, n)) until
   a sample does not fit: that sample is kept for the next pack and the pack is emitted.

A sample larger than an empty pack is rejected and counted (packing.Packer). State (`get_state` / `set_state`) =
the step, every group stream's grain state with the kept-over sample's group rewound to just before it, and the
draw counter: a restored iterator yields exactly the packs the original would have.
"""

from __future__ import annotations

import collections
import copy

import grain
import numpy as np

from data_pipelines.bad_records import BadRecordCounter
from data_pipelines.mixture import GroupReader, GroupSource, Mixture
from data_pipelines.packing import Packer
from data_pipelines.schema import BadRecord
from data_pipelines.worker_prefetch import IN_PROCESS, StreamOptions, close_stream, prefetch_in_workers
from unimedvl_jax.curriculum import StageSchedule

MANDATORY_TRIES = 64  # consecutive samples of a mandatory group that may fail to fit before it is an error
MAX_REJECTED_IN_A_ROW = 1000  # drawn samples in a row too large for an empty pack before it is an error
DRAW_SALT = 0x6D6978  # separates the group-draw rng from other seeded streams


def _bad(error: BadRecord) -> tuple:
    return error.reason, error.record_id, error.detail, error.line


class ReadAndPlan:
    """Worker-side transform: group element -> ('plan', SamplePlan, [bad]) or ('bad', [bad]), bad = BadRecord
    fields (images dropped from a kept T2I row, or the rejected line itself)."""

    def __init__(self, reader: GroupReader, planner):
        self.reader, self.planner = reader, planner

    def __call__(self, element, rng: np.random.Generator):
        try:
            record, dropped = self.reader.read(element)
            return "plan", self.planner(record, rng), [_bad(e) for e in dropped]
        except BadRecord as e:
            return "bad", [_bad(e)]


class MixturePackIterator:
    """PackedBatch iterator over a Mixture (module docstring); `packs_per_step` packs per train step set the
    curriculum stage tag of each batch (the curriculum's task weights do not apply: the YAML's weights do)."""

    def __init__(self, mixture: Mixture, schedule: StageSchedule, planner, packer: Packer, *, seed: int = 0,
                 shard_index: int = 0, shard_count: int = 1, stream: StreamOptions = IN_PROCESS,
                 start_step: int = 0, packs_per_step: int = 1):
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        self.groups = [g for g in mixture.groups if g.weight > 0 or g.mandatory]
        self.schedule, self.planner, self.packer, self.seed = schedule, planner, packer, int(seed)
        self.packs_per_step, self.stream_options = packs_per_step, stream
        self._shares = []
        for g in self.groups:
            share = grain.MapDataset.source(GroupSource(g))[shard_index::shard_count]
            if len(share) == 0:
                raise ValueError(f"{mixture.path}: group {g.name!r} has no line for process {shard_index}/"
                                 f"{shard_count}")
            self._shares.append(share)
        self.mandatory = [k for k, g in enumerate(self.groups) if g.mandatory]
        self.weighted = [k for k, g in enumerate(self.groups) if g.weight > 0]
        weights = np.asarray([self.groups[k].weight for k in self.weighted], np.float64)
        self._cum = np.cumsum(weights) / weights.sum() if self.weighted else np.zeros(0)
        self.bad_records = BadRecordCounter()
        self.groups_seen = collections.Counter()
        self.last_pack, self.last_pack_groups = None, []
        self.step = start_step
        self._iters = None
        self._draws = 0
        self._held = None        # (group index, plan, that group's stream state before the plan was read)
        self._resume = None

    # -- streams -------------------------------------------------------------------------------------------
    def _stream(self, k: int):
        seed = self.seed + 7919 * k
        ds = self._shares[k].shuffle(seed=seed).repeat().random_map(
            ReadAndPlan(GroupReader(self.groups[k]), self.planner), seed=seed + 104729)
        return prefetch_in_workers(ds, self.stream_options)

    def _start(self, state: dict | None = None) -> None:
        for it in self._iters or []:  # stop the replaced streams' worker processes
            close_stream(it)
        self._iters = [self._stream(k) for k in range(len(self.groups))]
        self.packer.discard_open()
        self._held, self._draws = None, 0
        if state is not None:
            for it, s in zip(self._iters, state["streams"]):
                it.set_state(copy.deepcopy(s))
            self._draws = int(state["draws"])
            if state["held"] is not None:
                k = int(state["held"])
                self._held = (k, *self._read(k))
        self._resume = self._snapshot()

    def _read(self, k: int):
        """(next plan of group k, its stream state before it); bad lines / images are counted on the way."""
        it = self._iters[k]
        for _ in range(len(self._shares[k]) + 1):
            before = it.get_state()
            item = next(it)
            for reason, rid, detail, line in item[-1]:
                self.bad_records.add(BadRecord(reason, rid, detail, line=line))
            if item[0] == "plan":
                return item[1], before
        raise ValueError(f"mixture group {self.groups[k].name!r}: a whole pass over its lines gave no usable "
                         f"sample; bad records: {self.bad_records.as_dict()['by_reason']}")

    def _draw(self) -> int:
        """A weighted group index (draw number self._draws of the run)."""
        u = np.random.default_rng([self.seed, DRAW_SALT, self._draws]).random()
        self._draws += 1
        return self.weighted[min(int(np.searchsorted(self._cum, u, side="right")), len(self.weighted) - 1)]

    def _snapshot(self) -> dict:
        streams = [it.get_state() for it in self._iters]
        if self._held is not None:
            streams[self._held[0]] = self._held[2]
        return {"streams": copy.deepcopy(streams), "draws": self._draws,
                "held": None if self._held is None else self._held[0]}

    # -- packing -------------------------------------------------------------------------------------------
    def _add(self, k: int, plan, names: list) -> None:
        self.packer.add(plan)
        names.append(self.groups[k].name)

    def _add_mandatory(self, k: int, names: list) -> None:
        for _ in range(MANDATORY_TRIES):
            plan, _ = self._read(k)
            problems = self.packer.overflow(plan)
            if not problems:
                return self._add(k, plan, names)
            self.packer.reject(plan, problems, "mandatory sample does not fit the pack:")
        raise ValueError(f"mixture group {self.groups[k].name!r}: {MANDATORY_TRIES} samples in a row did not fit "
                         f"beside the pack's other mandatory samples; raise the pack budgets (data.max_tokens, ...)")

    def __iter__(self):
        return self

    def __next__(self):
        stage = self.schedule.stage_at(self.step // self.packs_per_step)
        if self._iters is None:
            self._start()
        names: list[str] = []
        for k in self.mandatory:
            self._add_mandatory(k, names)
        if self._held is not None:
            k, plan, _ = self._held
            self._held = None
            problems = self.packer.overflow(plan)
            if problems:
                self.packer.reject(plan, problems, "sample kept for this pack does not fit beside the mandatory "
                                                   "samples:")
            else:
                self._add(k, plan, names)
        rejected_in_a_row = 0
        while self.weighted:
            k = self._draw()
            plan, before = self._read(k)
            problems = self.packer.oversize(plan)
            if problems:
                self.packer.reject(plan, problems)
                rejected_in_a_row += 1
                if rejected_in_a_row > MAX_REJECTED_IN_A_ROW:
                    raise ValueError(f"{rejected_in_a_row} drawn samples in a row exceed an empty pack's budgets "
                                     f"(last: {self.packer.stats.rejected_records[-1:]}); raise data.max_tokens / "
                                     f"the other budgets or lower the image transforms' sizes")
            elif self.packer.overflow(plan):
                self._held = (k, plan, before)
                break
            else:
                self._add(k, plan, names)
        (pack,) = self.packer.flush()
        self.last_pack, self.last_pack_groups = pack, names
        self.groups_seen.update(names)
        self._resume = self._snapshot()
        self.step += 1
        return pack.batch.replace(stage=np.asarray(stage, np.int32))

    # -- checkpointing -------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """JSON-serialisable state: resume at `step`, re-reading the sample kept for the next pack."""
        return {"step": int(self.step), "mixture": copy.deepcopy(self._resume)}

    def set_state(self, state: dict) -> None:
        """Restore a state from get_state (on a freshly built or a running iterator)."""
        self.step = int(state["step"])
        if state["mixture"] is None:
            self._iters = None
            return
        self._start(state["mixture"])

    def stats(self) -> dict:
        """Counters: batches, samples per group, packer stats, bad records by reason."""
        p = self.packer.stats
        return {"step": self.step, "groups": dict(self.groups_seen), "packer": dict(
            samples=p.samples, packs=p.packs, rejected=p.rejected, rejected_by_budget=dict(p.rejected_by_budget),
            rejected_records=list(p.rejected_records)), "bad_records": self.bad_records.as_dict()}
