"""Flax NNX modules of UniMedVL: one file per block family."""
