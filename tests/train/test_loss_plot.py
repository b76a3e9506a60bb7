"""The loss-curve PNG: latest restart wins per step, non-finite rows are left out, stages are coloured."""

import json

import numpy as np
from PIL import Image

from unimedvl_jax.train.loss_plot import COLORS, moving_average, plot_loss_curves, read_step_rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_latest_restart_wins_and_nonfinite_dropped(tmp_path):
    rows = [{"kind": "step", "step": s, "stage": 0, "loss": 1.0, "ce": 0.5, "mse": 0.5, "finite": True}
            for s in (1, 2, 3)]
    rows += [{"kind": "summary", "step": 3}, {"kind": "step", "step": 3, "stage": 0, "loss": 9.0, "ce": 4.5,
                                               "mse": 4.5, "finite": True},
             {"kind": "step", "step": 4, "stage": 1, "loss": float("nan"), "ce": 0, "mse": 0, "finite": False}]
    _write(tmp_path / "m.jsonl", rows)
    got = read_step_rows(tmp_path / "m.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3] and got[-1]["loss"] == 9.0


def test_moving_average_matches_numpy():
    x = np.random.default_rng(0).normal(size=50)
    want = np.array([x[max(0, i - 6):i + 1].mean() for i in range(50)])
    np.testing.assert_allclose(moving_average(x, 7), want, rtol=1e-12)


def test_png_has_three_panels_in_stage_colours(tmp_path):
    rows = [{"kind": "step", "step": s, "stage": (s - 1) // 30, "loss": 5.0 / s, "ce": 3.0 / s, "mse": 2.0 / s}
            for s in range(1, 91)]
    _write(tmp_path / "m.jsonl", rows)
    out = plot_loss_curves(tmp_path / "m.jsonl", tmp_path / "curves.png", ("a", "b", "c"), window=5)
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    for color in COLORS:
        assert (pixels == np.array(color)).all(axis=1).sum() > 100, color
