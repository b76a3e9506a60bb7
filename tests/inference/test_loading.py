"""The library loaders work whatever flax's eager-sharding mode is (flax 0.12 shards variables at creation by
default, which needs a mesh) and leave the caller's mode as it was: a fresh interpreter that never calls
nnx.use_eager_sharding loads a tiny training workdir, its params checkpoint and the official tiny directory, and
generates with the loaded model."""

import os
import pathlib
import subprocess
import sys

import pytest

from unimedvl_jax.testing import save_small_inference_workdir

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ["What imaging modality is this?", "This is a CT scan of the chest.", "An axial brain MRI slice."] * 30

SCRIPT = """
import sys
from flax import nnx
from unimedvl_jax.inference.loading import load_for_inference
from unimedvl_jax.inference.text_generation import TextSegment, generate
from unimedvl_jax.interop.checkpoint_import import import_official
from unimedvl_jax.interop.params_checkpoint import load_params_checkpoint

workdir, official = sys.argv[1:]
assert nnx.using_eager_sharding(), "expected flax's default mode in a fresh interpreter"
m = load_for_inference(workdir)
raw, _ = load_params_checkpoint(workdir + "/final", weights="params")
imported, _, report = import_official(official)
assert nnx.using_eager_sharding(), "a loader changed the caller's mode"
ids = generate(m.model, [[TextSegment(m.tokenizer.encode("What imaging modality is this?"))]], max_new_tokens=2)
print("OK", len(ids[0]), sum(report.loaded.values()))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return save_small_inference_workdir(tmp_path_factory.mktemp("loading") / "run", CORPUS)


def test_loaders_need_no_eager_sharding_setting(workdir, official_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), str(official_dir / "tiny_ckpt")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("OK ")
