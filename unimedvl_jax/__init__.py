"""unimedvl_jax: a JAX/Flax NNX reimplementation of UniMedVL (BAGEL-7B-MoT medical derivative)."""

__version__ = "0.1.0"
