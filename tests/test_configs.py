"""Configs are ml_collections files overridable from the command line (config_flags)."""

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    from absl import app, flags
    from ml_collections import config_flags
    from unimedvl_jax.config import validate_model_config
    config_flags.DEFINE_config_file("config")

    def main(_):
        cfg = flags.FLAGS.config
        validate_model_config(cfg.model)
        print(cfg.model.llm.num_layers, cfg.model.llm.layer_module, cfg.model.attention_backend)

    app.run(main)
""")


def run(*args):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


def test_command_line_overrides():
    res = run("--config=configs/tiny.py", "--config.model.llm.num_layers=2", "--config.model.attention_backend=chunked")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["2", "mot", "chunked"]


def test_released_config_and_bad_override():
    assert run("--config=configs/unimedvl_14b.py").stdout.split() == ["28", "mot", "auto"]
    res = run("--config=configs/tiny.py", "--config.model.vae.downsample=4")
    assert res.returncode != 0 and "vae.downsample=4 must equal 2**(len(ch_mult)-1)=8" in res.stderr


def test_1p5b_config_builds_abstractly_with_the_hand_counted_parameters():
    import jax
    import numpy as np
    from flax import nnx

    from configs import unimedvl_1p5b
    from unimedvl_jax.models.unimedvl import UniMedVL

    cfg = unimedvl_1p5b.get_config()
    assert (cfg.model.dtype, cfg.data.max_tokens, cfg.model.vit.num_layers) == ("bfloat16", 8192, 26)
    model = jax.eval_shape(lambda: nnx.split(UniMedVL(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)[1])
    counts = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model):
        top = str(getattr(path[0], "key", path[0]))
        counts[top] = counts.get(top, 0) + int(np.prod(leaf.shape))
    total = sum(counts.values())
    print(f"unimedvl_1p5b: {total:,} parameters {counts}")
    # One MoT expert of one layer: q (+bias), k, v (+bias, 2 KV heads of 128), o, QK-norm, SwiGLU, two RMSNorms.
    h, kv, mlp, vocab = 1536, 256, 8960, 151936
    expert = (h * h + h) + 2 * (h * kv + kv) + h * h + 2 * 128 + 3 * h * mlp + 2 * h
    assert expert == 46_798_080
    assert counts["language_model"] == 28 * 2 * expert + 2 * vocab * h + 2 * h == 3_087_442_944
    # + SigLIP-so400m 402.6 M, FLUX AE 83.8 M, connector 4.1 M, time embedder 2.8 M, latent bridges 0.2 M
    assert 3.57e9 < total < 3.59e9


def test_1p5b_config_loads_from_the_command_line():
    assert run("--config=configs/unimedvl_1p5b.py").stdout.split() == ["28", "mot", "auto"]
