"""unimedvl-build-data: build ArrayRecord shards of unimed-mini or of a JSONL manifest (cached: a second run is a
no-op).

    unimedvl-build-data --dataset unimed-mini --data-dir DIR [--shard-records N]
    unimedvl-build-data --dataset manifest --manifest FILE --data-dir DIR [--shard-records N]
    (or python -m data_pipelines.build ...)

Prints the dataset directory, per-split / per-task / per-modality counts, bad records by reason and shard bytes.
Bad manifest lines (not UTF-8, invalid JSON, a repeated id, missing fields, missing / unreadable / oversize
images, ...) are skipped, logged with their record id and line and counted by reason (data_pipelines/manifest.py);
a split left without a valid record is skipped with a warning and recorded as empty while the others are written.
A missing manifest, or one without any valid record, is one `unimedvl-build-data: error: ...` line and exit
status 2.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import time

from absl import flags

from data_pipelines import prepare, tfds_builder
from data_pipelines.sources import unimed_mini
from unimedvl_jax import entry_point


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("dataset", None, ["unimed-mini", "manifest"], "what to build", flag_values=fv)
    flags.DEFINE_string("data-dir", None, "TFDS data directory to write into", flag_values=fv)
    flags.DEFINE_string("manifest", None, "JSONL manifest (with --dataset manifest)", flag_values=fv)
    flags.DEFINE_integer("shard-records", None, "records per ArrayRecord shard (default: TFDS size-based sharding, "
                         "one shard < 64 MiB)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max-examples-per-split", None, "truncate each split (trial builds)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("max-side", None, f"unimed-mini: longest image side (default {unimed_mini.MAX_SIDE})",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("force", False, "rebuild even if the dataset is already prepared", flag_values=fv)


COMMAND = entry_point.Command("unimedvl-build-data", __doc__, _define, required=("dataset", "data-dir"))


def make_source(args):
    """Record source selected by the options."""
    if args.dataset == "manifest":
        if args.manifest is None:
            raise entry_point.UsageError("--dataset manifest needs --manifest FILE")
        return tfds_builder.ManifestSource(pathlib.Path(args.manifest))
    if args.manifest is not None:
        raise entry_point.UsageError("--manifest only applies to --dataset manifest")
    return tfds_builder.UnimedMiniSource(args.max_side or unimed_mini.MAX_SIDE)


def run(args) -> int:
    """Build (or find cached) the selected dataset and print its summary."""
    source = make_source(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    data_dir = pathlib.Path(args.data_dir)
    print(f"building {source.name} into {data_dir} ...", flush=True)
    builder, generated = tfds_builder.build(source, data_dir, records_per_shard=args.shard_records,
                                            max_examples_per_split=args.max_examples_per_split, force=args.force)
    path = pathlib.Path(builder.data_dir)
    print(("built" if generated else "already built (cached, nothing to do)") + f" in {time.time() - start:.1f}s")
    print(prepare.summary(path))
    return 0


def main(argv=None) -> int:
    """Entry point of unimedvl-build-data / `python -m data_pipelines.build`; `argv`: the arguments after the
    program name (default sys.argv[1:])."""
    return COMMAND.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
