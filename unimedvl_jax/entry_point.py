"""The shared start of every command line: no stray arguments, quiet library logging, join the multi-process job
the environment describes (a no-op for one process), and flax's explicit-sharding mode."""

from __future__ import annotations

import logging


def start(prog: str, argv=None, *, timeout_s: float | None = None):
    """Prepare this process for `prog`; argv (absl's) must hold only the program name. Returns the ClusterSpec."""
    if argv is not None and len(argv) > 1:
        from absl import app

        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.WARNING)
    from unimedvl_jax import distributed

    spec = distributed.initialize_or_exit(prog, timeout_s=timeout_s)
    from flax import nnx

    nnx.use_eager_sharding(False)  # variables are placed by sharding.shard_model / their checkpoints
    return spec
