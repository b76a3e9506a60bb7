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
    assert run("--config=configs/unimedvl_14b.py").stdout.split() == ["28", "mot", "chunked"]
    res = run("--config=configs/tiny.py", "--config.model.vae.downsample=4")
    assert res.returncode != 0 and "vae.downsample=4 must equal 2**(len(ch_mult)-1)=8" in res.stderr
