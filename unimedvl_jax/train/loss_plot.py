"""Per-stage loss curves of a run as a PNG (PIL only, no plotting library): total, CE and MSE against the step,
a moving average over the raw values, curriculum stage boundaries marked and named."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

TERMS = ("loss", "ce", "mse")
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44))   # one per stage (cycled)


def read_step_rows(metrics_jsonl) -> list[dict]:
    """The per-step rows of a metrics.jsonl, the latest (re)start winning for repeated steps, ordered by step."""
    rows = {}
    with open(metrics_jsonl) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("kind") == "step" and row.get("finite", True):
                    rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def plot_loss_curves(metrics_jsonl, out_png, stage_names, *, window: int = 20, width: int = 900,
                     panel_height: int = 220) -> str:
    """Write a 3-panel PNG (loss, ce, mse vs step; colour = stage) of a run's metrics.jsonl; returns out_png."""
    rows = read_step_rows(metrics_jsonl)
    if not rows:
        raise ValueError(f"{metrics_jsonl}: no finite step rows to plot")
    steps = np.array([r["step"] for r in rows], np.float64)
    stages = np.array([r["stage"] for r in rows])
    left, right, top, gap = 60, 20, 24, 40
    image = Image.new("RGB", (width, len(TERMS) * (panel_height + gap) + top), "white")
    draw = ImageDraw.Draw(image)
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)
    sx = lambda s: left + (s - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    for p, term in enumerate(TERMS):
        values = moving_average(np.array([r[term] for r in rows], np.float64), window)
        y_top = top + p * (panel_height + gap)
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1.0
        sy = lambda v: y_top + panel_height - (v - lo) / (hi - lo) * panel_height  # noqa: E731,B023
        draw.rectangle([left, y_top, width - right, y_top + panel_height], outline=(160, 160, 160))
        draw.text((4, y_top - 14), f"{term} (moving average over {window} steps)", fill="black")
        draw.text((4, y_top), f"{hi:.3g}", fill="black")
        draw.text((4, y_top + panel_height - 10), f"{lo:.3g}", fill="black")
        for s in range(len(steps) - 1):
            color = COLORS[int(stages[s + 1]) % len(COLORS)]
            draw.line([sx(steps[s]), sy(values[s]), sx(steps[s + 1]), sy(values[s + 1])], fill=color, width=2)
        for b in np.flatnonzero(np.diff(stages)) + 1:   # stage boundaries
            draw.line([sx(steps[b]), y_top, sx(steps[b]), y_top + panel_height], fill=(120, 120, 120))
        for st in np.unique(stages):
            first = steps[np.argmax(stages == st)]
            draw.text((sx(first) + 3, y_top + 2), stage_names[int(st)], fill=COLORS[int(st) % len(COLORS)])
        draw.text((left, y_top + panel_height + 2), f"step {int(x0)}", fill="black")
        draw.text((width - right - 70, y_top + panel_height + 2), f"step {int(steps.max())}", fill="black")
    image.save(out_png)
    return str(out_png)
