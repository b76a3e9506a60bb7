"""unimedvl_jax: a JAX/Flax NNX reimplementation of UniMedVL (BAGEL-7B-MoT medical derivative)."""

import os

__version__ = "0.1.0"

# XLA:CPU hands dots, convolutions and reductions to its YNNPACK library by default. On the CPUs we measured, its
# convolutions and its row / column reductions are 1.5–10× slower than XLA's own kernels (VAE encode 0.63 s -> 0.38 s,
# training forward + backward 0.82 s -> 0.64 s, docs/packed_sequence.md §4.7), while its dots are as fast as any, so
# only dots go to it. Set before any JAX backend starts (importing this package first is enough); a value the user
# already put in XLA_FLAGS wins, and the flag means nothing to the TPU / GPU compilers.
CPU_LIBRARY_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_LIBRARY_FUSION_FLAG}".strip()
