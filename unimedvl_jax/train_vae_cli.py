"""unimedvl-train-vae: train the config's FLUX-architecture VAE on its dataset's train split (train/vae_training.py).

    unimedvl-train-vae --config configs/tiny.py --out runs/vae [--config.vae_training.steps=600 ...]
    unimedvl-train --config configs/tiny.py --workdir runs/x --config.train.init_vae_from=runs/vae

The unimed-mini dataset is built into config.data.data_dir when missing. Exit status 0 on success, 2 on a bad
command line.
"""

from __future__ import annotations


from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (e.g. configs/tiny.py)",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "directory for the VAE checkpoint (config.json + params/)")
flags.mark_flags_as_required(["config", "out"])


def _run(argv) -> None:
    from unimedvl_jax.entry_point import start

    start("unimedvl-train-vae", argv)
    from data_pipelines.prepare import ensure_dataset
    from unimedvl_jax.train.vae_training import train_vae

    cfg = _CONFIG.value
    if "vae_training" not in cfg:
        raise app.UsageError("the config has no vae_training section (see unimedvl_jax/train/vae_training.py)")
    ensure_dataset(cfg.data)
    train_vae(cfg, _OUT.value, console=lambda s: print(s, flush=True))


def main(argv=None) -> None:
    """Console-script entry point (absl app; --config / --out / --config.x.y=v flags)."""
    app.run(_run, argv=argv)


if __name__ == "__main__":
    main()
