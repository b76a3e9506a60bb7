"""Every ```python block of README.md runs as written: each in a fresh interpreter (flax's default modes, nothing
from conftest), in a directory holding what the blocks read — a tiny randomly initialised training workdir
runs/tiny and a scan.png — with 4 simulated CPU devices for the sharding example. A block that raises fails."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unimedvl_jax.data_config import data_config
from unimedvl_jax.testing import save_inference_workdir, small_model_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.start(), m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```", README, re.S | re.M)]
CORPUS = ["What imaging modality is this?", "This is a CT scan of the chest.", "An axial brain MRI slice.",
          "Increase the resolution of this image by 2x.", "Create an axial contrast-enhanced CT slice."] * 20


def _section(offset: int) -> str:
    """The README heading a block sits under (for test ids)."""
    headings = re.findall(r"^#+ (.+)$", README[:offset], re.M)
    return re.sub(r"\W+", "-", headings[-1]).strip("-").lower() if headings else "top"


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    """runs/tiny: the small test model with an 8× VAE (so 128×128 images are 8×8 latent tokens) saved as a training
    workdir with tokenizer and data section; scan.png: a 48×64 RGB image."""
    cwd = tmp_path_factory.mktemp("readme")
    cfg = small_model_config()
    cfg.llm.vocab_size = 1024
    cfg.special_tokens.update(dict(bos_token_id=1000, eos_token_id=1001, start_of_image=1002, end_of_image=1003))
    cfg.vae.update(ch_mult=[1, 1, 1, 1], downsample=8)
    data = data_config(vit_transform=dict(max_size=112, min_size=56, stride=14),
                       vae_transform=dict(max_size=128, min_size=64, stride=16), vae_image_size=(128, 128))
    save_inference_workdir(cwd / "runs" / "tiny", cfg, data, CORPUS)
    rgb = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(cwd / "scan.png")
    return cwd


def test_readme_has_its_python_examples():
    assert len(BLOCKS) >= 4, f"found {len(BLOCKS)} ```python blocks in README.md"


@pytest.mark.parametrize("offset, code", BLOCKS, ids=[f"{i}-{_section(o)}" for i, (o, _) in enumerate(BLOCKS)])
def test_readme_block_runs(readme_dir, offset, code):
    script = readme_dir / f"block_{offset}.py"
    script.write_text(code)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, script.name], capture_output=True, text=True, cwd=readme_dir, env=env,
                         timeout=600)
    line = README[:offset].count("\n") + 1
    assert res.returncode == 0, f"README.md block at line {line} failed:\n{code}\n{res.stdout}\n{res.stderr}"
