"""unimedvl-build-data: build ArrayRecord shards of unimed-mini, of a JSONL manifest or of a UniMedVL mixture YAML
(cached: a second run is a no-op).

    unimedvl-build-data --dataset unimed-mini --data-dir DIR [--shard-records N]
    unimedvl-build-data --dataset manifest --manifest FILE --data-dir DIR [--shard-records N]
    unimedvl-build-data --dataset mixture --mixture YAML [--dataset-info FILE] --data-dir DIR [--shard-records N]
    (or python -m data_pipelines.build ...)

A mixture (docs/unimedvl_format.md) is written as one 'train' split of every group's selected lines / rows, each
record carrying its loader's item plan and its group's image transforms; its bad lines, rows and images are
counted by reason like a manifest's. Train on the shards with data.dataset=<the printed config name> (the
curriculum's task mixture then applies), or stream the YAML directly with data.mixture=YAML (its weights and
mandatory groups apply).

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
    flags.DEFINE_enum("dataset", None, ["unimed-mini", "manifest", "mixture"], "what to build", flag_values=fv)
    flags.DEFINE_string("data-dir", None, "TFDS data directory to write into", flag_values=fv)
    flags.DEFINE_string("manifest", None, "JSONL manifest (with --dataset manifest)", flag_values=fv)
    flags.DEFINE_string("mixture", None, "UniMedVL mixture YAML (with --dataset mixture)", flag_values=fv)
    flags.DEFINE_string("dataset-info", None, "dataset_info YAML / JSON of the mixture (default: the YAML's "
                        "dataset_info key)", flag_values=fv)
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
    for option, dataset in (("manifest", "manifest"), ("mixture", "mixture"), ("dataset_info", "mixture")):
        if getattr(args, option) is not None and args.dataset != dataset:
            raise entry_point.UsageError(f"--{option.replace('_', '-')} only applies to --dataset {dataset}")
    if args.dataset == "manifest":
        if args.manifest is None:
            raise entry_point.UsageError("--dataset manifest needs --manifest FILE")
        return tfds_builder.ManifestSource(pathlib.Path(args.manifest))
    if args.dataset == "mixture":
        if args.mixture is None:
            raise entry_point.UsageError("--dataset mixture needs --mixture YAML")
        return tfds_builder.MixtureSource(pathlib.Path(args.mixture), args.dataset_info)
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
