"""unimedvl-train: train (or resume) UniMedVL from an ml_collections config file.

    unimedvl-train --config configs/tiny.py --workdir runs/x [--config.train.batch_packs=4 --config.a.b=v ...]

The workdir holds checkpoints/ (resumed automatically), metrics.jsonl, tb/ (TensorBoard), tokenizer/ (when the
tokenizer is trained on the data), config.json and, at the end, final/ (export with
`unimedvl-export --checkpoint <workdir>/final`). SIGTERM saves a checkpoint and exits 0. The unimed-mini dataset
is built into config.data.data_dir when missing. Exit status: 0 done or preempted, 1 on a training error
(e.g. too many consecutive non-finite steps), 2 on a bad command line, 3 when joining a multi-process job failed.

Multi-process runs (TPU pods, SLURM, GKE, launch/local.py) are joined from the environment by
unimedvl_jax.distributed.initialize() before JAX is used; --init_timeout (or UNIMEDVL_INIT_TIMEOUT) bounds the
wait for the coordinator and the other processes.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (e.g. configs/tiny.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, final params)")
_INIT_TIMEOUT = flags.DEFINE_float("init_timeout", None, "seconds to wait for the coordinator and all processes "
                                   "of a multi-process job (default: UNIMEDVL_INIT_TIMEOUT or 300)")
flags.mark_flags_as_required(["config", "workdir"])


def run(argv, *, hooks=None) -> None:
    """The command after flag parsing; `hooks` (train/loop.py TrainHooks) serve tests (tests/train/hooked_train.py)."""
    from unimedvl_jax.entry_point import start

    # before any JAX computation: joins the multi-process job described by the environment, if any
    spec = start("unimedvl-train", argv, timeout_s=_INIT_TIMEOUT.value)
    if spec.multi_process:
        print(f"unimedvl-train: {spec.describe()}", flush=True)
    from unimedvl_jax.train.loop import NonFiniteError, StageMismatchError, train

    try:
        result = train(_CONFIG.value, _WORKDIR.value, hooks=hooks)
    except (NonFiniteError, StageMismatchError) as e:
        print(f"unimedvl-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"unimedvl-train: {'preempted' if result.preempted else 'done'} at step {result.step}", flush=True)


def main(argv=None) -> None:
    """Console-script entry point (absl app; --config / --workdir / --config.x.y=v flags)."""
    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
