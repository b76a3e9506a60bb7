"""Greedy sequential packing of sample plans into static-shape PackedBatches (docs/packed_sequence.md §4.3–4.5).

Samples are appended in arrival order while every budget holds; a sample that does not fit closes the current
pack and opens the next one (it is never dropped). A sample that exceeds a budget on its own can never fit and is
rejected (logged with its record id and the budget, counted in `Packer.stats`, the first ids kept there). The
tail of every pack is one causal PAD sample with its own sample and split id; every index buffer is padded with T
(one past the end). Pure numpy, picklable: it runs inside data-loader worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np

from data_pipelines.sample_plan import SamplePlan
from unimedvl_jax.packed_batch import CAUSAL, PAD, TEXT, VAE, VIT, PackedBatch

log = logging.getLogger(__name__)

# Budget names = fields of PackBudgets = keys of SamplePlan.usage() (plus the per-image vae_image_size check).
COUNT_BUDGETS = ("max_tokens", "und_capacity", "gen_capacity", "max_ce", "max_vit_patches", "max_vae_tokens",
                 "max_vae_images")
KEEP_REJECTED = 1000  # rejected record ids listed in PackerStats; all are counted


@dataclasses.dataclass(frozen=True)
class PackBudgets:
    """Static sizes of a pack: T, C_und, C_gen, C_ce, P, V, N and the padded VAE image size (Hmax, Wmax)."""

    max_tokens: int
    und_capacity: int
    gen_capacity: int
    max_ce: int
    max_vit_patches: int
    max_vae_tokens: int
    max_vae_images: int
    vae_image_size: tuple[int, int]

    def __post_init__(self):
        if min(getattr(self, n) for n in COUNT_BUDGETS) < 0 or self.max_tokens < 1:
            raise ValueError(f"invalid {self}: budgets must be >= 0 and max_tokens >= 1")
        if self.max_vae_tokens > 0 and self.max_vae_images < 1:
            raise ValueError("max_vae_tokens > 0 needs max_vae_images >= 1 (padding latent tokens read image 0)")

    @classmethod
    def from_config(cls, data_cfg) -> "PackBudgets":
        """From the data config fields of the same names."""
        h, w = (int(v) for v in data_cfg["vae_image_size"])
        return cls(**{n: int(data_cfg[n]) for n in COUNT_BUDGETS}, vae_image_size=(h, w))


@dataclasses.dataclass
class Pack:
    """One packed batch (numpy arrays) with its bookkeeping."""

    batch: PackedBatch
    record_ids: list[str]
    sample_tokens: list[int]   # real tokens per sample, in pack order (sample id = list index)
    usage: dict[str, int]      # budget name -> amount used by the real samples

    @property
    def num_real_tokens(self) -> int:
        return sum(self.sample_tokens)


@dataclasses.dataclass
class PackerStats:
    """Counters of a Packer: accepted samples, emitted packs, rejections per budget (and the first rejected
    records: 'record id: why')."""

    samples: int = 0
    packs: int = 0
    rejected: int = 0
    rejected_by_budget: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejected_records: list = dataclasses.field(default_factory=list)


def _pad_to(arrays, capacity: int, fill, dtype, width: int | None = None) -> np.ndarray:
    """Concatenate 1-D (or (n, width)) arrays and pad to `capacity` rows with `fill`."""
    shape_tail = () if width is None else (width,)
    out = np.full((capacity,) + shape_tail, fill, dtype)
    data = np.concatenate(arrays) if arrays else np.zeros((0,) + shape_tail, dtype)
    if data.shape[0] > capacity:  # budgets are checked before a sample joins a pack
        raise AssertionError(f"{data.shape[0]} rows exceed the capacity {capacity}")
    out[: data.shape[0]] = data
    return out


class Packer:
    """Packs SamplePlans into static-shape Packs: `add(plan) -> [finished packs]`, `flush() -> [last pack]`."""

    def __init__(self, budgets: PackBudgets, *, vit_patch_dim: int):
        self.budgets = budgets
        self.vit_patch_dim = int(vit_patch_dim)
        self.stats = PackerStats()
        self._open: list[SamplePlan] = []
        self._used = dict.fromkeys(COUNT_BUDGETS, 0)

    @classmethod
    def from_config(cls, data_cfg, model_cfg) -> "Packer":
        """Packer with PackBudgets.from_config(data_cfg) and the model's ViT patch width."""
        return cls(PackBudgets.from_config(data_cfg),
                   vit_patch_dim=int(model_cfg.vit.patch_size) ** 2 * int(model_cfg.vit.num_channels))

    def oversize(self, plan: SamplePlan) -> list[str]:
        """Budgets this sample exceeds on its own ('budget (need > limit)'); empty if it can fit an empty pack."""
        b = self.budgets
        problems = [f"{n} ({v} > {getattr(b, n)})" for n, v in plan.usage().items() if v > getattr(b, n)]
        hmax, wmax = b.vae_image_size
        big = [img.shape[:2] for img in plan.vae_images if img.shape[0] > hmax or img.shape[1] > wmax]
        if big:
            problems.append(f"vae_image_size ({big[0][0]}x{big[0][1]} > {hmax}x{wmax})")
        return problems

    def _fits(self, usage: dict[str, int]) -> bool:
        return all(self._used[n] + usage[n] <= getattr(self.budgets, n) for n in COUNT_BUDGETS)

    def overflow(self, plan: SamplePlan) -> list[str]:
        """Budgets `plan` exceeds next to the samples already in the open pack ('budget (used + need > limit)', or
        oversize()'s problems); empty if it fits."""
        problems = self.oversize(plan)
        if problems:
            return problems
        return [f"{n} ({self._used[n]} + {v} > {getattr(self.budgets, n)})" for n, v in plan.usage().items()
                if self._used[n] + v > getattr(self.budgets, n)]

    @property
    def open_samples(self) -> int:
        """Number of samples in the open pack."""
        return len(self._open)

    def reject(self, plan: SamplePlan, problems: list[str], why: str = "it alone exceeds") -> None:
        """Count and log a sample that is not packed; `problems` are 'budget (detail)' strings."""
        self.stats.rejected += 1
        self.stats.rejected_by_budget.update(p.split(" ")[0] for p in problems)
        if len(self.stats.rejected_records) < KEEP_REJECTED:
            self.stats.rejected_records.append(f"{plan.record_id}: {why} {', '.join(problems)}")
        log.warning("packing: rejected record %r, %s %s", plan.record_id, why, ", ".join(problems))

    def add(self, plan: SamplePlan) -> list[Pack]:
        """Add a sample; returns the pack it closed (if it did not fit the open one), else []."""
        problems = self.oversize(plan)
        if problems:
            self.reject(plan, problems)
            return []
        usage = plan.usage()
        done = [] if self._fits(usage) else self.flush()
        self._open.append(plan)
        for n in COUNT_BUDGETS:
            self._used[n] += usage[n]
        self.stats.samples += 1
        return done

    def flush(self) -> list[Pack]:
        """Emit the open pack (if any)."""
        if not self._open:
            return []
        pack = assemble_pack(self._open, self.budgets, self.vit_patch_dim)
        self._open, self._used = [], dict.fromkeys(COUNT_BUDGETS, 0)
        self.stats.packs += 1
        return [pack]

    def discard_open(self) -> int:
        """Drop the open pack's samples without emitting them (their stream is rewound by the caller)."""
        n = len(self._open)
        self._open, self._used = [], dict.fromkeys(COUNT_BUDGETS, 0)
        self.stats.samples -= n
        return n

    def pack_all(self, plans):
        """Iterate the packs of `plans` (flushing at the end)."""
        for plan in plans:
            yield from self.add(plan)
        yield from self.flush()


def assemble_pack(plans: list[SamplePlan], budgets: PackBudgets, vit_patch_dim: int) -> Pack:
    """Lay `plans` out one after another, pad every buffer to its budget, add the trailing PAD sample."""
    b = budgets
    t = b.max_tokens
    i32 = np.int32
    text_ids, kind = np.zeros(t, i32), np.full(t, PAD, i32)
    sample_id, split_id = np.zeros(t, i32), np.zeros(t, i32)
    split_mode, position_ids = np.full(t, CAUSAL, i32), np.zeros(t, i32)
    parts = collections.defaultdict(list)
    hmax, wmax = b.vae_image_size
    vae_images = np.zeros((b.max_vae_images, hmax, wmax, 3), np.float32)
    tok = split = n_vit = n_vae = 0
    for s, p in enumerate(plans):
        sl = slice(tok, tok + p.num_tokens)
        text_ids[sl], kind[sl], position_ids[sl] = p.text_ids, p.token_kind, p.position_ids
        sample_id[sl], split_id[sl], split_mode[sl] = s, p.split_index + split, p.split_modes[p.split_index]
        parts["ce_index"].append(p.ce_index + tok), parts["ce_labels"].append(p.ce_labels)
        parts["vit_patches"].append(p.vit_patches), parts["vit_position_ids"].append(p.vit_position_ids)
        parts["vit_image_id"].append(p.vit_image + n_vit), parts["vit_token_index"].append(p.vit_token_index + tok)
        for name in ("vae_token_row", "vae_token_col", "vae_position_ids", "vae_timestep"):
            parts[name].append(getattr(p, name))
        parts["vae_token_image"].append(p.vae_token_image + n_vae)
        parts["vae_token_index"].append(p.vae_token_index + tok)
        for img in p.vae_images:  # zero padding bottom/right (docs/packed_sequence.md §4.4)
            vae_images[n_vae, : img.shape[0], : img.shape[1]] = img
            n_vae += 1
        n_vit += p.num_vit_images
        tok += p.num_tokens
        split += len(p.split_modes)
    # Trailing pad sample: own sample and split id, causal, position 0 (docs/packed_sequence.md §4.3).
    sample_id[tok:], split_id[tok:] = len(plans), split

    und = np.nonzero((kind == TEXT) | (kind == VIT))[0]
    gen = np.nonzero(kind == VAE)[0]
    n_ce = sum(len(x) for x in parts["ce_index"])
    batch = PackedBatch(
        text_ids=text_ids, token_kind=kind, sample_id=sample_id, split_id=split_id, split_mode=split_mode,
        position_ids=position_ids,
        und_index=_pad_to([und], b.und_capacity, t, i32), gen_index=_pad_to([gen], b.gen_capacity, t, i32),
        ce_index=_pad_to(parts["ce_index"], b.max_ce, t, i32),
        ce_labels=_pad_to(parts["ce_labels"], b.max_ce, 0, i32),
        ce_weight=_pad_to([np.ones(n_ce, np.float32)], b.max_ce, 0.0, np.float32),
        vit_patches=_pad_to(parts["vit_patches"], b.max_vit_patches, 0.0, np.float32, vit_patch_dim),
        vit_position_ids=_pad_to(parts["vit_position_ids"], b.max_vit_patches, 0, i32),
        # Padding patches form one extra image so they never attend to a real one.
        vit_image_id=_pad_to(parts["vit_image_id"], b.max_vit_patches, n_vit, i32),
        vit_token_index=_pad_to(parts["vit_token_index"], b.max_vit_patches, t, i32),
        vae_images=vae_images,
        vae_token_image=_pad_to(parts["vae_token_image"], b.max_vae_tokens, 0, i32),
        vae_token_row=_pad_to(parts["vae_token_row"], b.max_vae_tokens, 0, i32),
        vae_token_col=_pad_to(parts["vae_token_col"], b.max_vae_tokens, 0, i32),
        vae_position_ids=_pad_to(parts["vae_position_ids"], b.max_vae_tokens, 0, i32),
        vae_token_index=_pad_to(parts["vae_token_index"], b.max_vae_tokens, t, i32),
        vae_timestep=_pad_to(parts["vae_timestep"], b.max_vae_tokens, -np.inf, np.float32),
    )
    usage = {n: sum(p.usage()[n] for p in plans) for n in COUNT_BUDGETS}
    return Pack(batch, [p.record_id for p in plans], [p.num_tokens for p in plans], usage)
