"""unimedvl-train: train (or resume) UniMedVL from an ml_collections config file.

    unimedvl-train --config configs/tiny.py --workdir runs/x [--config.train.batch_packs=4 --config.a.b=v ...]

The workdir holds checkpoints/ (resumed automatically), metrics.jsonl, tb/ (TensorBoard), tokenizer/ (when the
tokenizer is trained on the data), config.json and, at the end, final/ (export with
`unimedvl-export --checkpoint <workdir>/final`). SIGTERM saves a checkpoint and exits 0. The unimed-mini dataset
is built into config.data.data_dir when missing. Exit status: 0 done or preempted, 1 on a training error
(e.g. too many consecutive non-finite steps), 2 on a bad command line or bad input (a missing or corrupt file,
invalid JSON, a dataset that is not built: one `unimedvl-train: error: ...` line naming it; --debug shows the
traceback), 3 when joining a multi-process job failed, 4 when no checkpoint could be restored as asked (a damaged
one under train.on_corrupt_checkpoint=fail, a missing or damaged train.restore_step, none intact), 5 when a
checkpoint could not be written (disk full, quota, permission; the last intact checkpoint is kept), 6 when another
process of a multi-process job was lost (UNIMEDVL_HEARTBEAT_TIMEOUT).

Multi-process runs (TPU pods, SLURM, GKE, launch/local.py) are joined from the environment by
unimedvl_jax.distributed.initialize() before JAX is used; --init_timeout (or UNIMEDVL_INIT_TIMEOUT) bounds the
wait for the coordinator and the other processes.
"""

from __future__ import annotations

import sys

from absl import flags

from unimedvl_jax import entry_point
from unimedvl_jax.train.checkpoint_faults import CheckpointError
from unimedvl_jax.train.loop import NonFiniteError, StageMismatchError, train


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, final params)", flag_values=fv)
    flags.DEFINE_float("init_timeout", None, "seconds to wait for the coordinator and all processes of a "
                       "multi-process job (default: UNIMEDVL_INIT_TIMEOUT or 300)", flag_values=fv)


COMMAND = entry_point.Command("unimedvl-train", __doc__, _define, required=("config", "workdir"),
                              config=entry_point.ConfigFile())


def run(args, *, hooks=None) -> int:
    """The command after flag parsing; `hooks` (train/loop.py TrainHooks) serve tests (tests/train/hooked_train.py)."""
    # before any JAX computation: joins the multi-process job described by the environment, if any
    spec = entry_point.start("unimedvl-train", timeout_s=args.init_timeout)
    if spec.multi_process:
        print(f"unimedvl-train: {spec.describe()}", flush=True)
    try:
        result = train(args.config, args.workdir, hooks=hooks)
    except (NonFiniteError, StageMismatchError) as e:
        print(f"unimedvl-train: error: {e}", file=sys.stderr, flush=True)
        return 1
    except CheckpointError as e:  # 4: restore, 5: save (train/checkpoint_faults.py)
        print(f"unimedvl-train: error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    print(f"unimedvl-train: {'preempted' if result.preempted else 'done'} at step {result.step}", flush=True)
    return 0


def main(argv=None) -> int:
    """Console-script entry point; `argv`: the arguments after the program name (default sys.argv[1:])."""
    return COMMAND.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
