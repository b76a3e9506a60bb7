"""Modality-balanced sampling inside each task family (config `data.balance_alpha`).

A record of modality m in a task family whose split holds n_m records of that modality is drawn with probability
proportional to n_m^-alpha: alpha = 0 keeps today's uniform sampling over records (the view is returned unchanged,
so the pipeline stays bit-identical), alpha = 1 makes every modality equally likely, values in between interpolate.
The balanced view is a fixed-length, seeded resampling (with replacement) of the task view's indices, so the rest of
the grain pipeline (per-process share, shuffle, mixing, packing) is unchanged and every process builds the same view.
"""

from __future__ import annotations

import collections
import hashlib
import math

import numpy as np

from data_pipelines.pipeline import IndexedSource, record_bytes
from data_pipelines.schema import Record


def element_modality(element, *, record_id: str) -> str:
    """The 'modality' field of a source element (a TFDS example dict), else that of its decoded record."""
    modality = element.get("modality") if isinstance(element, dict) else None
    if modality is None:
        return Record.from_bytes(record_bytes(element), record_id=record_id).modality
    if isinstance(modality, np.ndarray):
        modality = modality.item()
    return modality.decode() if isinstance(modality, bytes) else str(modality)


def modality_weights(modalities: list[str], alpha: float) -> np.ndarray:
    """Per-record sampling probabilities: n_m^-alpha for a record of modality m, normalised to sum to 1."""
    if not modalities:
        raise ValueError("cannot balance an empty task source")
    counts = collections.Counter(modalities)
    weights = np.array([counts[m] ** -float(alpha) for m in modalities], np.float64)
    return weights / weights.sum()


def _check_alpha(alpha: float) -> float:
    """alpha as a float; a clear error for negative or non-finite values."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"data.balance_alpha must be a finite number >= 0, got {alpha}")
    return alpha


def balanced_view(task_source, alpha: float, seed: int, *, length: int | None = None, name: str = "task"):
    """Modality-balanced resampling of a random-access task source (len(task_source) draws unless `length`);
    alpha = 0 returns `task_source` itself."""
    alpha = _check_alpha(alpha)
    if alpha == 0:
        return task_source
    n = len(task_source)
    modalities = [element_modality(task_source[i], record_id=f"{name}[{i}]") for i in range(n)]
    draws = np.random.default_rng(seed).choice(n, size=n if length is None else int(length), replace=True,
                                               p=modality_weights(modalities, alpha))
    if isinstance(task_source, IndexedSource):   # compose, so the view indexes the underlying source directly
        return IndexedSource(task_source.source, task_source.indices[draws])
    return IndexedSource(task_source, draws)


def task_seed(seed: int, task: str) -> int:
    """Seed of one task family's balanced view: the data seed mixed with the task name (stable across runs)."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}|{task}".encode()).digest()[:8], "big")


def balance_tasks(task_sources: dict, alpha: float, *, seed: int) -> dict:
    """balanced_view of every per-task source (pipeline.split_by_task); alpha = 0 returns the dict unchanged."""
    if _check_alpha(alpha) == 0:
        return task_sources
    return {task: balanced_view(source, alpha, task_seed(seed, task), name=task)
            for task, source in task_sources.items()}
