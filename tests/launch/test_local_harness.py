"""launch/local.py end to end: 2 processes × 4 simulated CPU devices train tests/launch/dist_config.py (a (2,2,2)
mesh, fsdp_tensor rules, global batch 8) for 6 steps; 1 process × 8 devices is the reference (8 steps, same
data_shards=2); the 2-process checkpoint is then resumed by 1 process × 8 devices for steps 7-8.

The reference and the 2-process run start together (CPU time is what they share); all runs share a JAX
compilation cache, and XLA's backend optimisations are turned down (compile time dominates on CPU; every run
uses the same flags, so the comparisons are like for like)."""

import collections
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "tests/launch/dist_config.py"
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT = 1200
LOSS_TERMS = ("loss", "ce", "mse", "grad_norm")


def read_rows(path, kind="step"):
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


def first_run(rows):
    return [r for r in rows if r["run"] == rows[0]["run"]]


def check(proc, what):
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"{what}: rc={proc.returncode}\n{out[-4000:]}\n{err[-8000:]}"
    return out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, unimed_mini_dir):
    base = tmp_path_factory.mktemp("harness")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=FAST_XLA,
               JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for key in [k for k in env if k.startswith(("UNIMEDVL_", "SLURM_"))]:
        del env[key]
    common = [f"--config={CONFIG}", f"--config.data.data_dir={unimed_mini_dir}"]
    one_env = dict(env, XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count=8")

    def trainer(workdir, *extra):
        return subprocess.Popen([sys.executable, "-m", "unimedvl_jax.train_cli", *common, f"--workdir={workdir}",
                                 *extra], cwd=ROOT, env=one_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    one = trainer(base / "one", "--config.train.data_shards=2")
    two = subprocess.Popen([sys.executable, "launch/local.py", "-n", "2", "-d", "4", "--log_dir", str(base / "logs"),
                            "--", *common, f"--workdir={base / 'two'}", "--config.train.steps=6",
                            "--config.train.write_final=True"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    two_out, _ = check(two, "2 processes × 4 devices")
    check(one, "1 process × 8 devices")
    tb_after_two = sorted(p.name for p in (base / "two" / "tb").iterdir())
    resumed_out, _ = check(trainer(base / "two", "--config.train.steps=8"), "resume in 1 process")
    return {"base": base, "two_out": two_out, "resumed_out": resumed_out, "tb_after_two": tb_after_two,
            "one": {r["step"]: r for r in read_rows(base / "one" / "metrics.jsonl")},
            "logs": {i: (base / "logs" / f"process_{i}.log").read_text() for i in (0, 1)}}


def assert_close(got, want, what):
    for k in LOSS_TERMS:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=f"{what} {k}")
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-6) and got["stage"] == want["stage"], what


def test_two_processes_train_like_one_process(runs):
    assert sorted(runs["one"]) == list(range(1, 9))
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} rules 'fsdp_tensor' on 8 device(s), 2 process(es)" in \
        runs["logs"][0]
    assert "process 0 feeds shard(s) [0] (4 of 8 packs)" in runs["logs"][0]
    two = first_run(read_rows(runs["base"] / "two" / "metrics.jsonl"))
    assert [r["step"] for r in two] == list(range(1, 7))
    assert [r["stage"] for r in two] == [0, 0, 0, 1, 1, 1]
    for r in two:
        assert_close(r, runs["one"][r["step"]], f"step {r['step']}")
        assert r["finite"]


def test_processes_read_disjoint_records_whose_union_is_the_single_process_run(runs):
    p0 = first_run(read_rows(runs["base"] / "two" / "metrics.jsonl"))
    p1 = read_rows(runs["base"] / "two" / "metrics.process1.jsonl")
    assert [r["step"] for r in p1] == list(range(1, 7))
    for a, b in zip(p0, p1):
        assert a["pack_rows"] == [0, 1, 2, 3] and b["pack_rows"] == [4, 5, 6, 7]
        reference = runs["one"][a["step"]]
        assert reference["pack_rows"] == list(range(8))
        assert a["record_ids"] + b["record_ids"] == reference["record_ids"], a["step"]  # row by row
    ids0 = collections.Counter(i for r in p0 for pack in r["record_ids"] for i in pack)
    ids1 = collections.Counter(i for r in p1 for pack in r["record_ids"] for i in pack)
    assert ids0 and ids1 and not set(ids0) & set(ids1)
    single = collections.Counter(i for s in range(1, 7) for pack in runs["one"][s]["record_ids"] for i in pack)
    assert ids0 + ids1 == single


def test_process_zero_owns_logs_every_process_writes_checkpoint_shards(runs):
    import orbax.checkpoint as ocp

    from unimedvl_jax.interop.params_checkpoint import load_params_checkpoint

    logs, two = runs["logs"], runs["base"] / "two"
    assert "step 2 [foundation] loss" in logs[0] and "Total:" in logs[0] and "FLOP model" in logs[0]
    assert "step 2 [" not in logs[1] and "Total:" not in logs[1] and "mesh {" not in logs[1]
    assert "unimedvl-train: env: process 1 of 2, coordinator 127.0.0.1:" in logs[1]
    assert len(runs["tb_after_two"]) == 1  # one TensorBoard writer (process 0)
    assert read_rows(two / "metrics.jsonl", "summary") and not read_rows(two / "metrics.process1.jsonl", "summary")
    assert not (two / "metrics.process0.jsonl").exists()
    for step in (3, 6):
        state = two / "checkpoints" / str(step) / "state"
        for i in (0, 1):  # each process wrote the array shards it holds
            shard_dir = state / f"ocdbt.process_{i}"
            assert any((shard_dir / "d").iterdir()), shard_dir  # data files, not just a manifest
    data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(two / "checkpoints" / "6" / "data")
    assert data["data_shards"] == 2 and data["batch_packs"] == 8 and sorted(data["states"]) == ["0", "1"]
    assert all(s["step"] == 6 * 4 for s in data["states"].values())  # 4 packs per shard per step
    # the export-ready final/ checkpoint written by both processes, equal to checkpoint 6's params
    model, cfg = load_params_checkpoint(two / "final", weights="params")
    assert cfg.llm.num_layers == 1
    import jax

    state_dir = two / "checkpoints" / "6" / "state"  # written on 8 devices: restore onto this one device
    meta = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), meta)
    saved = ocp.StandardCheckpointer().restore(state_dir, target)
    want = saved["params"]["language_model"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]["value"]
    got = model.language_model.model.layers[0].self_attn.q_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_two_process_checkpoint_resumes_in_one_process(runs):
    out = runs["resumed_out"]
    assert "restored checkpoint step 6" in out
    assert "on 8 device(s), 1 process(es)" in out
    assert "data: 2 shard(s) of 4 pack(s) per step; process 0 feeds shard(s) [0, 1] (8 of 8 packs)" in out
    rows = read_rows(runs["base"] / "two" / "metrics.jsonl")
    resumed = [r for r in rows if r["run"] != rows[0]["run"]]
    assert [r["step"] for r in resumed] == [7, 8]
    for r in resumed:
        assert_close(r, runs["one"][r["step"]], f"resumed step {r['step']}")
        assert r["record_ids"] == runs["one"][r["step"]]["record_ids"]
