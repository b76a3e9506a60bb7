"""Modality-balanced sampling (data_pipelines/balance.py): alpha = 0 is the identity, the empirical modality
frequencies match n_m^(1-alpha) / sum n^(1-alpha) within 3 sigma, the view is deterministic per seed."""

import collections

import numpy as np
import pytest

from data_pipelines.balance import balance_tasks, balanced_view, modality_weights, task_seed
from data_pipelines.pipeline import IndexedSource, split_by_task
from unimedvl_jax.data_config import data_config

COUNTS = {"MRI": 900, "US": 80, "CT": 15, "CFP": 5}   # as lopsided as unimed-mini's train split


def _source():
    """A random-access source of TFDS-like elements (bytes fields), modalities interleaved with two tasks."""
    elements = [{"modality": m.encode(), "task": task.encode(), "id": f"{m}-{i}".encode()}
                for m, n in COUNTS.items() for i in range(n) for task in ("understanding", "generation")]
    order = np.random.default_rng(0).permutation(len(elements))
    return [elements[i] for i in order]


def _modalities(view):
    return collections.Counter(view[i]["modality"].decode() for i in range(len(view)))


def test_alpha_zero_is_the_identity_and_the_config_default():
    tasks = split_by_task(_source())
    assert balanced_view(tasks["understanding"], 0.0, seed=3) is tasks["understanding"]
    assert balance_tasks(tasks, 0, seed=3) is tasks
    assert data_config().balance_alpha == 0.0


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_empirical_modality_frequencies_within_3_sigma(alpha):
    task = split_by_task(_source())["understanding"]
    n_draws = 20_000
    view = balanced_view(task, alpha, seed=11, length=n_draws)
    assert len(view) == n_draws and isinstance(view, IndexedSource)
    assert view.source is task.source          # composed onto the underlying source, not wrapped twice
    seen = _modalities(view)
    total = sum(n ** (1 - alpha) for n in COUNTS.values())
    for m, n in COUNTS.items():
        p = n ** (1 - alpha) / total
        sigma = np.sqrt(n_draws * p * (1 - p))
        assert abs(seen[m] - n_draws * p) <= 3 * sigma, (m, seen[m], n_draws * p, sigma)
    if alpha == 1.0:
        assert set(seen) == set(COUNTS)


def test_default_length_and_weights():
    task = split_by_task(_source())["generation"]
    view = balanced_view(task, 1.0, seed=0)
    assert len(view) == len(task) == sum(COUNTS.values())
    weights = modality_weights(["a", "a", "a", "b"], 1.0)
    np.testing.assert_allclose(weights, [1 / 6, 1 / 6, 1 / 6, 1 / 2])
    np.testing.assert_allclose(modality_weights(["a", "a", "a", "b"], 0.0), [0.25] * 4)


def test_deterministic_per_seed_and_per_task():
    tasks = split_by_task(_source())
    a = balance_tasks(tasks, 0.7, seed=5)
    b = balance_tasks(tasks, 0.7, seed=5)
    for t in tasks:
        np.testing.assert_array_equal(a[t].indices, b[t].indices)
    c = balance_tasks(tasks, 0.7, seed=6)
    assert not np.array_equal(a["understanding"].indices, c["understanding"].indices)
    assert task_seed(5, "understanding") != task_seed(5, "generation")
    for t in tasks:   # every index stays inside the task's own records
        assert set(a[t].indices.tolist()) <= set(tasks[t].indices.tolist())


def test_bad_alpha_and_empty_source_are_clear_errors():
    task = split_by_task(_source())["understanding"]
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="balance_alpha"):
            balanced_view(task, bad, seed=0)
    with pytest.raises(ValueError, match="empty"):
        balanced_view(IndexedSource([], []), 1.0, seed=0)
