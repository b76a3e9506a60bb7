"""Input-pipeline throughput on unimed-mini: samples/s and packed tokens/s with 0, 1 and 2 grain workers.

    python bench/data_pipeline.py [--data-dir data] [--batches 40] [--workers 0 1 2]

Builds unimed-mini first if the data dir does not have it. Uses configs/tiny.py's data section (pack budgets,
transforms, CFG dropout) and curriculum; the first batch of each run (worker start-up) is timed separately.
"""

from __future__ import annotations

import argparse
import time


def run(cfg, tokenizer, workers: int, batches: int) -> dict:
    from data_pipelines.loader import make_iterator

    start = time.perf_counter()
    it = make_iterator(cfg, tokenizer, num_workers=workers)
    next(it)
    first = time.perf_counter() - start
    samples0, tokens = it.packer.stats.samples, 0
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
        tokens += it.last_pack.num_real_tokens
    seconds = time.perf_counter() - start
    samples = it.stats()["packer"]["samples"] - samples0
    return {"workers": workers, "first_batch_s": first, "seconds": seconds, "batches": batches,
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "fill": tokens / (batches * cfg.data.max_tokens)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()

    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from configs import tiny
    from data_pipelines import tfds_builder
    from data_pipelines.loader import get_tokenizer
    from data_pipelines.sources import unimed_mini

    cfg = tiny.get_config()
    cfg.data.data_dir = args.data_dir
    cfg.curriculum.stage_steps = (100_000, 1, 1)  # stay in one stage while timing
    tfds_builder.build(tfds_builder.UnimedMiniSource(unimed_mini.MAX_SIDE), args.data_dir)
    tokenizer = get_tokenizer(cfg.data, cfg.model)
    rows = [run(cfg, tokenizer, w, args.batches) for w in args.workers]
    print(f"\nunimed-mini train split, configs/tiny.py packs of {cfg.data.max_tokens} tokens, {args.batches} batches\n")
    print("| workers | first batch (s) | samples/s | packed tokens/s | pack fill |")
    print("|--------:|----------------:|----------:|----------------:|----------:|")
    for r in rows:
        print(f"| {r['workers']:7d} | {r['first_batch_s']:15.1f} | {r['samples_per_s']:9.1f} | "
              f"{r['tokens_per_s']:15.0f} | {r['fill']:9.2f} |")


if __name__ == "__main__":
    main()
