"""The training loop end to end through the `unimedvl-train` CLI (subprocesses, CPU, fp32, tests/train/
loop_config.py: a shrunk tiny model, 256-token packs, stages of 4 + 4 + 4 steps) on unimed-mini built once into
tmp: exact resume after SIGKILL, SIGTERM preemption, restore onto other mesh shapes, the non-finite guard, metrics
files and the export-ready final/ checkpoint.

Every run of one program shares a persistent JAX compilation cache (a compiled step is reused, not recompiled);
runs that differ only in host-side test hooks (tests/train/hooked_train.py: sleep, poisoned batches) compile the
same program."""

import collections
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "tests/train/loop_config.py"
STEPS = 12
TIMEOUT = 600
# Compile time dominates these runs; every run of a comparison uses the same flags.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def env(tmp_path_factory, unimed_mini_dir):
    """Built unimed-mini + a compilation cache shared by the module's runs."""
    base = tmp_path_factory.mktemp("loop")
    return {"data": unimed_mini_dir, "cache": base / "jax_cache", "base": base}


def launch(env, workdir, *overrides, devices=1):
    """Start unimedvl-train (tests/train/hooked_train.py: the CLI plus test-only hooks) on `devices` simulated CPU
    devices."""
    proc_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                    JAX_COMPILATION_CACHE_DIR=str(env["cache"]), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                    XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "tests/train/hooked_train.py", f"--config={CONFIG}", f"--workdir={workdir}",
           f"--config.data.data_dir={env['data']}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def run(env, workdir, *overrides, devices=1, expect_rc=0):
    rc, out, err = finish(launch(env, workdir, *overrides, devices=devices))
    assert rc == expect_rc, f"rc={rc}\n{out[-3000:]}\n{err[-6000:]}"
    return out, err


def rows(workdir, kind="step"):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == kind]


def by_run(step_rows):
    """{run id: [rows]} in order of first appearance."""
    out = {}
    for r in step_rows:
        out.setdefault(r["run"], []).append(r)
    return list(out.values())


def committed(workdir, step):
    d = pathlib.Path(workdir) / "checkpoints"
    return (d / str(step) / "commit_success.txt").exists() and not any(
        p.name.startswith(f"{step}.") for p in d.iterdir())


def wait_for(predicate, proc, what, timeout=TIMEOUT, poll=0.05):
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


def steps_of(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(env):
    """One uninterrupted 12-step run (batch 2 packs, 1 device); peak_flops set so MFU is reported."""
    workdir = env["base"] / "reference"
    out, _ = run(env, workdir, "--config.train.peak_flops=1e12")
    return {"workdir": workdir, "stdout": out, "rows": {r["step"]: r for r in rows(workdir)}}


LOSS_TERMS = ("loss", "ce", "mse", "grad_norm", "lr")


def test_exact_resume_after_sigkill(env, reference):
    workdir = env["base"] / "killed"
    proc = launch(env, workdir, "--sleep_after_step=0.5")
    wait_for(lambda: (workdir / "checkpoints").is_dir() and committed(workdir, 6), proc, "checkpoint 6")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert steps_of(workdir) == [6] and not (workdir / "final").exists()

    out, _ = run(env, workdir)
    assert "restored checkpoint step 6" in out
    killed, restarted = by_run(rows(workdir))
    assert [r["step"] for r in restarted] == list(range(7, STEPS + 1))
    assert [r["step"] for r in killed][:6] == list(range(1, 7))
    ref = reference["rows"]
    for r in restarted:  # bit-identical: same program, same data, restored state
        assert {k: r[k] for k in LOSS_TERMS} == {k: ref[r["step"]][k] for k in LOSS_TERMS}, r["step"]
    consumed = [r["record_ids"] for r in killed if r["step"] <= 6] + [r["record_ids"] for r in restarted]
    assert consumed == [ref[s]["record_ids"] for s in range(1, STEPS + 1)]
    # none lost, none repeated: the same multiset of records as the uninterrupted run (which itself re-reads
    # some records: each stage's stream restarts the per-task shuffles, see data_pipelines/pipeline.py)
    flat = collections.Counter(rid for step in consumed for pack in step for rid in pack)
    assert flat == collections.Counter(rid for s in range(1, STEPS + 1) for pack in ref[s]["record_ids"]
                                       for rid in pack)
    assert sum(flat.values()) > 4 * STEPS
    assert (workdir / "final" / "config.json").exists()


def test_sigterm_saves_and_exits_zero_then_resumes(env, reference):
    workdir = env["base"] / "preempted"
    proc = launch(env, workdir, "--sleep_after_step=0.5")
    wait_for(lambda: any(r["step"] >= 3 for r in rows(workdir)), proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert rc == 0, err[-4000:]
    assert "preempted" in out
    stopped = max(r["step"] for r in rows(workdir))
    assert 3 <= stopped < STEPS
    assert steps_of(workdir)[-1] == stopped and committed(workdir, stopped)
    assert not (workdir / "final").exists()

    out, _ = run(env, workdir)
    assert f"restored checkpoint step {stopped}" in out
    first, second = by_run(rows(workdir))
    assert [r["step"] for r in second] == list(range(stopped + 1, STEPS + 1))
    for r in first + second:
        assert {k: r[k] for k in LOSS_TERMS} == {k: reference["rows"][r["step"]][k] for k in LOSS_TERMS}
        assert r["record_ids"] == reference["rows"][r["step"]]["record_ids"]
    assert (workdir / "final" / "params").is_dir()


def test_restore_onto_other_mesh_shapes(env):
    common = ("--config.train.batch_packs=8", "--config.train.write_final=False", "--config.data.num_workers=0")
    ref_dir = env["base"] / "mesh_222"
    run(env, ref_dir, *common, "--config.mesh.shape=(2,2,2)", "--config.mesh.rules=fsdp_tensor", devices=8)
    ref = {r["step"]: r for r in rows(ref_dir)}
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert 6 in steps_of(ref_dir)
    for name, shape, rules, devices in (("mesh_811", "(8,1,1)", "dp", 8), ("mesh_1", "(1,1,1)", "fsdp", 1)):
        workdir = env["base"] / name
        (workdir / "checkpoints").mkdir(parents=True)
        shutil.copytree(ref_dir / "checkpoints" / "6", workdir / "checkpoints" / "6")
        shutil.copytree(ref_dir / "tokenizer", workdir / "tokenizer")
        out, _ = run(env, workdir, *common, f"--config.mesh.shape={shape}", f"--config.mesh.rules={rules}",
                     devices=devices)
        assert "restored checkpoint step 6" in out and f"on {devices} device(s)" in out
        got = rows(workdir)
        assert [r["step"] for r in got] == list(range(7, STEPS + 1)), name
        for r in got:
            assert r["record_ids"] == ref[r["step"]]["record_ids"], (name, r["step"])
            for k in LOSS_TERMS:
                np.testing.assert_allclose(r[k], ref[r["step"]][k], rtol=1e-5, err_msg=f"{name} step {r['step']} {k}")


def test_consecutive_nonfinite_steps_stop_with_error(env):
    workdir = env["base"] / "nonfinite"
    _, err = run(env, workdir, "--poison_steps=2,5,6,7", "--config.data.num_workers=0",
                 "--config.train.max_consecutive_nonfinite=3", expect_rc=1)
    assert "step 7: 3 consecutive non-finite steps (train.max_consecutive_nonfinite=3)" in err
    assert "loss terms at step 7: ce=nan, mse=" in err and "loss=nan, grad_norm=" in err
    got = {r["step"]: r for r in rows(workdir)}
    assert max(got) == 7  # stopped there
    assert [got[s]["finite"] for s in range(1, 8)] == [True, False, True, True, False, False, False]
    assert [got[s]["consecutive_skipped"] for s in range(1, 8)] == [0, 1, 0, 0, 1, 2, 3]
    assert got[7]["skipped"] == 4
    summary = rows(workdir, "summary")
    assert summary[0]["step"] == 4 and summary[0]["skipped_steps"] == 1 and np.isfinite(summary[0]["loss"])
    assert not (workdir / "final").exists()


def read_tb_scalars(tb_dir):
    """{tag: [(step, value)]} from tensorboardX event files (TFRecord framing parsed by hand)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in pathlib.Path(tb_dir).glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metrics_files_and_final_checkpoint(env, reference):
    from unimedvl_jax.interop.params_checkpoint import load_params_checkpoint
    from unimedvl_jax.train.metrics import STEP_FIELDS, SUMMARY_FIELDS

    workdir = reference["workdir"]
    assert "Total:" in reference["stdout"]  # clu parameter overview
    assert "step 12 [unified] loss" in reference["stdout"] and "MFU" in reference["stdout"]
    steps = rows(workdir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert set(STEP_FIELDS) <= set(r), set(STEP_FIELDS) - set(r)
        assert r["finite"] and r["real_tokens"] > 0 and r["samples"] == sum(map(len, r["record_ids"]))
        assert len(r["record_ids"]) == 2  # batch_packs
    assert [r["stage"] for r in steps] == [0] * 4 + [1] * 4 + [2] * 4
    summaries = rows(workdir, "summary")
    assert [s["step"] for s in summaries] == [4, 8, 12]
    for s in summaries:
        assert set(SUMMARY_FIELDS) | {"mfu"} <= set(s)
        assert s["tokens_per_s"] > 0 and s["samples_per_s"] > 0
        assert s["mfu"] == pytest.approx(s["model_flops_per_s"] / 1e12)
        window = [r for r in steps if s["step"] - 4 < r["step"] <= s["step"]]
        assert s["loss"] == pytest.approx(np.mean([r["loss"] for r in window]), rel=1e-6)
    tb = read_tb_scalars(workdir / "tb")
    assert [step for step, _ in tb["train/loss"]] == [4, 8, 12]
    assert tb["train/loss"][-1][1] == pytest.approx(summaries[-1]["loss"], rel=1e-6)
    assert {"train/tokens_per_s", "train/mfu", "train/grad_norm", "train/lr"} <= set(tb)

    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "12" / "state")
    kernels = {}
    for weights, key in (("params", "params"), ("ema", "ema")):
        model, cfg = load_params_checkpoint(workdir / "final", weights=weights)
        assert cfg.llm.hidden_size == 64
        got = model.language_model.model.layers[0].self_attn.q_proj.kernel[...]
        want = saved[key]["language_model"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
        want = want["value"] if isinstance(want, dict) else want
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        kernels[weights] = np.asarray(got)
    assert not np.array_equal(kernels["params"], kernels["ema"])  # EMA (decay 0.9) lags the raw weights


# --- in-process pieces (no subprocess) -----------------------------------------------------------------------
def loop_config(data_dir):
    sys.path.insert(0, str(ROOT / "tests" / "train"))
    try:
        import loop_config as mod
    finally:
        sys.path.pop(0)
    cfg = mod.get_config()
    cfg.data.data_dir = str(data_dir)
    return cfg


def test_iterator_packs_follow_train_steps_and_stage_check(env, tmp_path):
    from data_pipelines.loader import get_tokenizer, make_iterator
    from unimedvl_jax.curriculum import StageSchedule
    from unimedvl_jax.train.loop import StageMismatchError, check_stage

    cfg = loop_config(env["data"])
    cfg.data.num_workers = 0  # stage tagging does not depend on worker processes (each would cost a spawn)
    schedule = StageSchedule.from_config(cfg.curriculum)
    it = make_iterator(cfg, get_tokenizer(cfg.data, cfg.model, workdir=str(tmp_path)), packs_per_step=3)
    for step in range(STEPS):  # 3 packs per train step: all of them carry the step's stage
        for _ in range(3):
            check_stage(next(it).stage, step, schedule)
    assert it.get_state()["step"] == 3 * STEPS
    plain = make_iterator(cfg, get_tokenizer(cfg.data, cfg.model, workdir=str(tmp_path)))
    stages = [int(next(plain).stage) for _ in range(2 * 4)]  # 1 pack per step: stage switches too early for B=2
    with pytest.raises(StageMismatchError, match=r"step 2: the data pipeline built a pack for stage 1 "
                                                 r"\(instruction\) but the curriculum puts step 2 in stage 0"):
        for k, stage in enumerate(stages):
            check_stage(stage, k // 2, schedule)


def test_flop_model_formula():
    from configs import tiny
    from unimedvl_jax.testing import Text, VaeImage, VitImage, build_packed_batch
    from unimedvl_jax.train.metrics import FlopModel

    model_cfg = tiny.get_config().model
    samples = [[VitImage((3, 4)), Text([5, 6, 7]), Text([8, 9, 10, 11], loss=True)],
               [Text([12, 13, 14]), VaeImage((2, 3), noised=True, timestep=0.3)]]
    batch = build_packed_batch(samples, model_cfg, pad_to=96)[0].to_numpy()
    fm = FlopModel(n_llm=10, n_head=7, n_vit=5, n_latent=3, llm_layers=2, llm_hidden=4, vit_layers=1, vit_hidden=2)
    n_ce = int(np.sum(batch.ce_index < 96))
    assert n_ce > 0
    expect = (6 * 10 * 30 + 6 * 7 * n_ce + 6 * 5 * 12 + 6 * 3 * 6 + 6 * 2 * 4 * (20 ** 2 + 10 ** 2)
              + 12 * 1 * 2 * 12 ** 2)
    assert fm.pack_flops(batch, [20, 10]) == expect


def test_flop_model_counts_one_mot_expert():
    import jax
    from flax import nnx

    from unimedvl_jax.models.unimedvl import UniMedVL
    from unimedvl_jax.train.metrics import FlopModel
    from unimedvl_jax.train.step import param_path

    cfg = loop_config("unused")
    _, params, _ = nnx.split(UniMedVL(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    sizes = {param_path(p): int(np.prod(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    layers = {k: v for k, v in sizes.items() if k.startswith("language_model.model.layers.")}
    gen = sum(v for k, v in layers.items() if "_moe_gen" in k)
    fm = FlopModel.from_params(params, cfg.model)
    assert fm.n_llm == sum(layers.values()) - gen == gen  # und and gen experts have the same size
    assert fm.n_head == 64 * 1024 and fm.llm_layers == 2 and fm.vit_hidden == 32
    assert fm.n_vit == sum(v for k, v in sizes.items() if k.startswith(("vit_model.", "connector.")))
