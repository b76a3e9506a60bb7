"""Launching `unimedvl-train` runs for the fault tests (tests/faults/fault_train.py: the CLI plus fault hooks) on
the tiny loop config (tests/train/loop_config.py: 12 steps, checkpoints every 6) or the 2-process config
(tests/launch/dist_config.py), and reading what they leave in the workdir.

Every run of a module shares one persistent JAX compilation cache and the same fast XLA flags, so each program
compiles once per module."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAINER = "tests/faults/fault_train.py"
LOOP_CONFIG = "tests/train/loop_config.py"
DIST_CONFIG = "tests/launch/dist_config.py"
TIMEOUT = 600
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LOSS_TERMS = ("loss", "ce", "mse", "grad_norm", "lr")


def base_env(cache) -> dict:
    """The environment of every run: CPU, the shared compilation cache, no inherited job variables."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count=1")
    for key in [k for k in env if k.startswith(("UNIMEDVL_", "SLURM_"))]:
        del env[key]
    return env


def launch(cache, data_dir, workdir, *flags, config=LOOP_CONFIG, env=None):
    """Start one trainer process (stdout/stderr piped)."""
    cmd = [sys.executable, TRAINER, f"--config={config}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env or base_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=TIMEOUT):
    """(returncode, stdout, stderr) once `proc` exits."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(cache, data_dir, workdir, *flags, expect_rc=0):
    """Run the trainer to its end; (stdout, stderr). Asserts the exit status."""
    rc, out, err = finish(launch(cache, data_dir, workdir, *flags))
    assert rc == expect_rc, f"rc={rc} (expected {expect_rc})\n{out[-3000:]}\n{err[-6000:]}"
    return out, err


def rows(path, kind="step"):
    """The rows of one kind of a metrics JSONL file (metrics.jsonl, metrics.abandoned.jsonl, ...)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == kind]


def committed(workdir, step) -> bool:
    return (pathlib.Path(workdir) / "checkpoints" / str(step) / "commit_success.txt").exists()


def entries(workdir) -> list[str]:
    """The names in <workdir>/checkpoints, sorted."""
    return sorted(os.listdir(pathlib.Path(workdir) / "checkpoints"))


def seed(source, workdir, steps, *, metrics=False):
    """A workdir holding copies of `source`'s checkpoints `steps` and tokenizer (+ metrics.jsonl and tb/)."""
    source, workdir = pathlib.Path(source), pathlib.Path(workdir)
    (workdir / "checkpoints").mkdir(parents=True)
    for step in steps:
        shutil.copytree(source / "checkpoints" / str(step), workdir / "checkpoints" / str(step))
    shutil.copytree(source / "tokenizer", workdir / "tokenizer")
    if metrics:
        shutil.copy(source / "metrics.jsonl", workdir / "metrics.jsonl")
        shutil.copytree(source / "tb", workdir / "tb")
    return workdir


def largest_array_file(step_dir) -> pathlib.Path:
    """The largest OCDBT data file of a checkpoint's state item (array chunks live there)."""
    files = [p for p in (pathlib.Path(step_dir) / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def assert_same_steps(got_rows, reference_rows, steps):
    """Bit-identical loss terms and records for `steps` (same program, same data, restored state)."""
    got = {r["step"]: r for r in got_rows}
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        assert {k: got[s][k] for k in LOSS_TERMS} == {k: reference_rows[s][k] for k in LOSS_TERMS}, s
        assert got[s]["record_ids"] == reference_rows[s]["record_ids"], s


def wait_for(predicate, proc, what, timeout=TIMEOUT, poll=0.002):
    """Poll `predicate` until true; fails if `proc` exits first or time runs out."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited (rc={proc.returncode}) before {what}\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")
