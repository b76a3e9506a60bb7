"""`unimedvl-train` with the test-only hooks of tests/train/test_loop.py (train/loop.py TrainHooks):

    python tests/train/hooked_train.py --config ... --workdir ... [--poison_steps=2,5] [--sleep_after_step=0.5]

--poison_steps   1-based steps whose batch gets ce_weight = NaN (forces a non-finite loss: the non-finite guard)
--sleep_after_step  seconds to sleep after dispatching each step (lets a test interrupt a run at a chosen point;
                 changes no result)
Everything else (flags, errors, exit status) is unimedvl-train's."""

import sys
import time

import numpy as np
from absl import flags

from unimedvl_jax import train_cli
from unimedvl_jax.train.loop import TrainHooks


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("poison_steps", [], "1-based steps whose batch gets ce_weight = NaN", flag_values=fv)
    flags.DEFINE_float("sleep_after_step", 0.0, "seconds to sleep after dispatching each step", flag_values=fv)


COMMAND = train_cli.COMMAND.extended(_define, doc=__doc__)


def _hooks(args) -> TrainHooks:
    poison = {int(s) for s in args.poison_steps}

    def on_batch(step, local):
        if step + 1 in poison:
            return local.replace(ce_weight=np.full_like(local.ce_weight, np.nan))
        return local

    sleep_s = args.sleep_after_step
    return TrainHooks(on_batch=on_batch if poison else None,
                      after_dispatch=(lambda step: time.sleep(sleep_s)) if sleep_s else None)


if __name__ == "__main__":
    sys.exit(COMMAND.run(lambda args: train_cli.run(args, hooks=_hooks(args))))
