"""`unimedvl-train` with the fault-injection hooks of tests/faults/ (train/loop.py TrainHooks):

    python tests/faults/fault_train.py --config ... --workdir ... [--sleep_after_step=0.5]
        [--fsize_limit_bytes=N --fsize_limit_after_checkpoint=6]

--sleep_after_step             seconds to sleep after dispatching each step (lets a test act at a chosen point;
                               changes no result)
--fsize_limit_bytes            once checkpoint --fsize_limit_after_checkpoint has committed, lower this process's
                               RLIMIT_FSIZE to N bytes: every later write past N bytes into one file fails with
                               EFBIG, as a full disk fails with ENOSPC (a real OS fault, no root needed). The hook
                               waits for that commit at the first step after it, so the limit never hits it.
Everything else (flags, errors, exit status) is unimedvl-train's."""

import os
import resource
import sys
import time

from absl import flags

from unimedvl_jax import train_cli
from unimedvl_jax.train.loop import TrainHooks


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_float("sleep_after_step", 0.0, "seconds to sleep after dispatching each step", flag_values=fv)
    flags.DEFINE_integer("fsize_limit_bytes", 0, "RLIMIT_FSIZE set once --fsize_limit_after_checkpoint has "
                         "committed (0 = none)", flag_values=fv)
    flags.DEFINE_integer("fsize_limit_after_checkpoint", 0, "checkpoint step after which the limit is set",
                         flag_values=fv)


COMMAND = train_cli.COMMAND.extended(_define)


def _hooks(args) -> TrainHooks:
    limit, after = int(args.fsize_limit_bytes), int(args.fsize_limit_after_checkpoint)
    marker = os.path.join(os.path.abspath(args.workdir), "checkpoints", str(after), "commit_success.txt")
    limited = False

    def after_dispatch(step: int) -> None:
        nonlocal limited
        if limit and not limited and step > after:
            while not os.path.exists(marker):
                time.sleep(0.01)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            limited = True
        if args.sleep_after_step:
            time.sleep(args.sleep_after_step)

    return TrainHooks(after_dispatch=after_dispatch if (limit or args.sleep_after_step) else None)


def main(argv=None) -> int:
    return COMMAND.run(lambda args: train_cli.run(args, hooks=_hooks(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
