"""Test-wide setup: logical axis names are metadata only (no mesh), fp32 everywhere."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

nnx.use_eager_sharding(False)

OFFICIAL = pathlib.Path(__file__).parent / "fixtures" / "official"


@pytest.fixture(scope="session")
def official_dir() -> pathlib.Path:
    """Directory holding the official tiny checkpoint and recorded fixtures (copied from shared/reference)."""
    return OFFICIAL

# grain worker processes parse absl flags on start; mark them parsed (DESIGN.md library notes).
from absl import flags as _absl_flags  # noqa: E402

_absl_flags.FLAGS.mark_as_parsed()
