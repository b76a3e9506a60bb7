"""bench/train_throughput.py runs end to end on a tiny setting and prints its table."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "train_throughput.py"


def bench(*args):
    return subprocess.run([sys.executable, str(SCRIPT), "--config", "configs/tiny.py", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=240)


def test_train_throughput_table(tmp_path):
    res = bench("--backends", "dense", "--pack-lengths", "256", "--repeats", "1", "--fwd-bwd-only",
                "--peak-tflops", "1", "--json", str(tmp_path / "rows.json"))
    assert res.returncode == 0, res.stderr
    header = next(line for line in res.stdout.splitlines() if line.startswith("| backend"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "backend", "dtype", "packs × T", "real tok", "compile s f+b / step", "fwd+bwd s", "official f+b s", "step s",
        "official step s", "tokens/s", "model TFLOP/s", "MFU", "capacity TFLOP/s", "MaxText TFLOP/s"]
    assert "| dense | float32 | 1 × 256 | 256 |" in res.stdout
    assert "und 256, gen 128, ce 128, vit 128, vae 128, vae_images 1" in res.stdout
    (row,) = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert row["fwd_bwd_s"] > 0 and "step_s" not in row and row["mfu"] == row["model_tflops_per_device"]
    flops = row["flops"]
    assert flops["capacity"]["llm"] > flops["model"]["llm"] and flops["maxtext"]["attention"] > 0


def test_unknown_backend_fails_in_config_validation():
    res = bench("--backends", "dense", "no_such_backend")
    assert res.returncode != 0 and "attention_backend='no_such_backend' not in" in res.stderr
    assert "building" not in res.stderr


def test_bad_config_file_is_one_line(tmp_path):
    """A missing config file, or one without get_config(), exits non-zero with one line naming it (no traceback)."""
    missing, no_getter = tmp_path / "missing.py", tmp_path / "no_getter.py"
    no_getter.write_text("x = 1\n")
    for path, line in ((missing, f"config file not found: {missing}"),
                       (no_getter, f"config file {no_getter} has no get_config()")):
        res = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path)], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=240)
        assert res.returncode != 0 and res.stderr.strip() == line, res.stderr
