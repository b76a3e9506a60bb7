"""bench/train_throughput.py runs end to end on a tiny setting and prints its table; bench/official_reference.py
checks its inputs."""

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


def test_official_reference_names_a_missing_checkout_or_python(tmp_path):
    """bench/official_reference.py checks both of its external inputs before it builds anything: one line each."""
    script = str(ROOT / "bench" / "official_reference.py")
    codes = tmp_path / "codes"
    (codes / "modeling" / "unimedvl").mkdir(parents=True)
    (codes / "modeling" / "unimedvl" / "bagel.py").write_text("")
    cases = ((["--official-src", str(tmp_path), "--torch-python", sys.executable],
              f"--official-src {tmp_path}: no modeling/unimedvl/bagel.py"),
             (["--official-src", str(codes), "--torch-python", str(tmp_path / "python")],
              f"--torch-python {tmp_path / 'python'}: not an executable python"))
    for argv, start in cases:
        res = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert res.returncode != 0 and res.stderr.startswith(start) and len(res.stderr.splitlines()) == 1, res.stderr
        assert "our side" not in res.stdout
