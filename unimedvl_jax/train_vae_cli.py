"""unimedvl-train-vae: train the config's FLUX-architecture VAE on its dataset's train split (train/vae_training.py).

    unimedvl-train-vae --config configs/tiny.py --out runs/vae [--config.vae_training.steps=600 ...]
    unimedvl-train --config configs/tiny.py --workdir runs/x --config.train.init_vae_from=runs/vae

The unimed-mini dataset is built into config.data.data_dir when missing. Exit status 0 on success, 2 on a bad
command line or bad input (a missing or corrupt file, a dataset that is not built: one `unimedvl-train-vae: error:
...` line naming it; --debug shows the traceback).
"""

from __future__ import annotations

import sys

from absl import flags

from data_pipelines.prepare import ensure_dataset
from unimedvl_jax import entry_point
from unimedvl_jax.train.vae_training import train_vae


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "directory for the VAE checkpoint (config.json + params/)", flag_values=fv)


COMMAND = entry_point.Command("unimedvl-train-vae", __doc__, _define, required=("config", "out"),
                              config=entry_point.ConfigFile(example="--config.vae_training.steps=1000"))


def run(args) -> None:
    entry_point.start("unimedvl-train-vae")
    cfg = args.config
    if "vae_training" not in cfg:
        raise entry_point.UsageError("the config has no vae_training section (unimedvl_jax/train/vae_config.py)")
    ensure_dataset(cfg.data)
    train_vae(cfg, args.out, console=lambda s: print(s, flush=True))


def main(argv=None) -> int:
    """Console-script entry point; `argv`: the arguments after the program name (default sys.argv[1:])."""
    return COMMAND.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
