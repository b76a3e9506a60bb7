"""Evaluation throughput: items/s of the VQA runner (eval/runner.py) at several batch sizes, on configs/tiny.py's
model with random weights (so every answer runs the full --max-new-tokens budget: rows are alike).

Each batch size answers the same --items items of random sizes (96-256 px, the tiny ViT transform's range) twice,
each time into a fresh directory with result files written as in a real run: the first run compiles what this
batch size has not compiled yet (the decode step per row count; prefill buckets are shared, so the first batch
size listed pays for them), the second is warm. Prints a Markdown table.

Usage:  python bench/eval.py [--batch 1 8] [--items 32] [--max-new-tokens 16] [--row-sharding]
        XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/eval.py --row-sharding   # rows over 4 devices
"""

from __future__ import annotations

import argparse
import io
import pathlib
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from PIL import Image

from configs import tiny
from unimedvl_jax.eval.items import EvalItem
from unimedvl_jax.eval.results_store import read_results
from unimedvl_jax.eval.runner import PREDICTIONS, answer_items, run_cache_size
from unimedvl_jax.inference.loading import load_for_inference
from unimedvl_jax.inference.row_sharding import RowSharding
from unimedvl_jax.testing import save_inference_workdir

QUESTIONS = ["What imaging modality is this?", "Is there a fracture?", "Which organ is shown in this image?",
             "Is this an axial slice?"]


def make_items(n: int, seed: int) -> list[EvalItem]:
    """n single-image closed questions with random RGB images of 96-256 px sides."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = rng.integers(96, 257, 2)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        items.append(EvalItem("manifest", f"s{seed}-{i}", (buf.getvalue(),), QUESTIONS[i % len(QUESTIONS)], "yes",
                              "closed"))
    return items


def measure(args, work: pathlib.Path):
    """[(batch, first-run s, warm-run s, predictions)], the cache size, the device count of the rows."""
    cfg = tiny.get_config()
    save_inference_workdir(work / "run", cfg.model, cfg.data, QUESTIONS * 50 + ["yes", "no", "CT", "MRI"] * 50)
    loaded = load_for_inference(work / "run")
    rows_over = RowSharding.over(loaded.model) if args.row_sharding else None
    items = make_items(args.items, 0)
    max_len = run_cache_size(items, loaded, args.max_new_tokens)

    results = []
    for batch in args.batch:
        seconds = []
        for run in ("cold", "warm"):
            start = time.perf_counter()
            answer_items(loaded, items, work / f"b{batch}-{run}", batch_size=batch,
                         max_new_tokens=args.max_new_tokens, row_sharding=rows_over, progress=False)
            seconds.append(time.perf_counter() - start)
        answers = {k: r["prediction"] for k, r in read_results(work / f"b{batch}-warm", PREDICTIONS).items()}
        results.append((batch, *seconds, answers))
    return results, max_len, len(rows_over.devices) if rows_over else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--row-sharding", action="store_true", help="split each batch's rows over the local devices")
    args = p.parse_args()
    nnx.use_eager_sharding(False)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        results, max_len, devices = measure(args, pathlib.Path(tmp))

    base = results[0][2]
    same = all(r[3] == results[0][3] for r in results)
    print(f"\nVQA runner, configs/tiny.py model (random weights), {args.items} items, {args.max_new_tokens} new "
          f"tokens each, cache {max_len} slots, {jax.default_backend()} backend, rows over {devices} device(s); "
          f"predictions identical across batch sizes: {same}\n")
    print("| batch | first run s (compiles incl.) | warm run s | warm items/s | warm vs first batch size |")
    print("|---|---|---|---|---|")
    for batch, cold, warm, _ in results:
        print(f"| {batch} | {cold:.2f} | {warm:.2f} | {args.items / warm:.2f} | {base / warm:.2f}× |")


if __name__ == "__main__":
    main()
