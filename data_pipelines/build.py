"""Build ArrayRecord shards of unimed-mini or of a JSONL manifest (cached: a second run is a no-op).

    python -m data_pipelines.build --dataset unimed-mini --data-dir DIR [--shard-records N]
    python -m data_pipelines.build --dataset manifest --manifest FILE --data-dir DIR [--shard-records N]

Prints the dataset directory, per-split / per-task / per-modality counts, bad records by reason and shard bytes.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

from data_pipelines import prepare, tfds_builder
from data_pipelines.sources import unimed_mini


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="unimedvl-build-data", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("unimed-mini", "manifest"), required=True)
    p.add_argument("--data-dir", required=True, type=pathlib.Path, help="TFDS data directory to write into")
    p.add_argument("--manifest", type=pathlib.Path, help="JSONL manifest (with --dataset manifest)")
    p.add_argument("--shard-records", type=int, default=None,
                   help="records per ArrayRecord shard (default: TFDS size-based sharding, one shard < 64 MiB)")
    p.add_argument("--max-examples-per-split", type=int, default=None, help="truncate each split (trial builds)")
    p.add_argument("--max-side", type=int, default=None, help="unimed-mini: longest image side (default 256)")
    p.add_argument("--force", action="store_true", help="rebuild even if the dataset is already prepared")
    args = p.parse_args(argv)
    if args.dataset == "manifest" and args.manifest is None:
        p.error("--dataset manifest needs --manifest FILE")
    if args.dataset == "unimed-mini" and args.manifest is not None:
        p.error("--manifest only applies to --dataset manifest")
    if args.shard_records is not None and args.shard_records < 1:
        p.error("--shard-records must be >= 1")
    return args


def make_source(args: argparse.Namespace):
    """Record source selected by the options."""
    if args.dataset == "manifest":
        return tfds_builder.ManifestSource(args.manifest)
    return tfds_builder.UnimedMiniSource(args.max_side or unimed_mini.MAX_SIDE)


def main(argv=None) -> int:
    """Entry point of `python -m data_pipelines.build` / unimedvl-build-data."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    source = make_source(args)
    print(f"building {source.name} into {args.data_dir} ...", flush=True)
    builder, generated = tfds_builder.build(source, args.data_dir, records_per_shard=args.shard_records,
                                            max_examples_per_split=args.max_examples_per_split, force=args.force)
    path = pathlib.Path(builder.data_dir)
    print(("built" if generated else "already built (cached, nothing to do)") + f" in {time.time() - start:.1f}s")
    print(prepare.summary(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
