"""Checkpoint faults on the tiny loop config (tests/train/loop_config.py: 12 steps, checkpoints every 6), each
against one uninterrupted reference run: a truncated array file in the latest checkpoint (fallback, exact
continuation, metrics history), a missing commit marker, on_corrupt_checkpoint=fail, train.restore_step, a full
disk (RLIMIT_FSIZE: EFBIG from the OS, as ENOSPC, without root), kill -9 while an async save is being written.

End-to-end scenarios run `unimedvl-train` as subprocesses (tests/faults/fault_train.py adds the fault hooks);
the restore policies are checked in-process on copies of the reference checkpoints, against the real TrainState
layout."""

import json
import os
import pathlib
import re
import signal
import struct
import sys

import harness
import pytest

STEPS = 12


@pytest.fixture(scope="module")
def env(tmp_path_factory, unimed_mini_dir):
    base = tmp_path_factory.mktemp("faults")
    return {"data": unimed_mini_dir, "cache": base / "jax_cache", "base": base}


def train(env, workdir, *flags, expect_rc=0):
    return harness.run(env["cache"], env["data"], workdir, *flags, expect_rc=expect_rc)


@pytest.fixture(scope="module")
def reference(env):
    """One uninterrupted 12-step run: checkpoints 6 and 12, metrics of every step."""
    workdir = env["base"] / "reference"
    train(env, workdir)
    assert harness.entries(workdir) == ["12", "6"]
    return {"workdir": workdir, "rows": {r["step"]: r for r in harness.rows(workdir / "metrics.jsonl")}}


# --- end to end ------------------------------------------------------------------------------------------------
def test_truncated_array_in_latest_checkpoint_falls_back_and_continues_exactly(env, reference):
    workdir = harness.seed(reference["workdir"], env["base"] / "truncated", (6, 12), metrics=True)
    damaged = harness.largest_array_file(workdir / "checkpoints" / "12")
    os.truncate(damaged, 1000)

    out, err = train(env, workdir)
    assert not err.strip(), err[-3000:]  # the stragglers of the failed read stay off the console
    warning = next(line for line in out.splitlines() if "is damaged" in line)
    ckpts = workdir / "checkpoints"
    assert re.fullmatch(rf"warning: checkpoint 12 is damaged \(array (params|opt_state|ema)\.\S+: OUT_OF_RANGE: "
                        rf"Error reading .* is not valid for value of size 1000 \(details: "
                        rf"{ckpts}/restore_error\.12\.log\)\); moved it to {ckpts}/12\.corrupt and restored "
                        rf"checkpoint 6 instead", warning), warning
    assert "restored checkpoint step 6" in out and "training steps 7..12" in out
    # set aside, never deleted; the continued run wrote a new checkpoint 12
    assert (ckpts / "12.corrupt" / damaged.relative_to(ckpts / "12")).stat().st_size == 1000
    assert harness.committed(workdir, 12) and "Traceback" in (ckpts / "restore_error.12.log").read_text()

    # the loss curve continues as the uninterrupted run's; one row per step in metrics.jsonl
    history = harness.rows(workdir / "metrics.jsonl")
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    harness.assert_same_steps(history, reference["rows"], range(1, STEPS + 1))
    assert {r["run"] for r in history if r["step"] <= 6} != {r["run"] for r in history if r["step"] > 6}
    assert [r["step"] for r in harness.rows(workdir / "metrics.jsonl", "summary")] == [4, 8, 12]
    abandoned = harness.rows(workdir / "metrics.abandoned.jsonl")
    assert [r["step"] for r in abandoned] == list(range(7, STEPS + 1))
    assert {r["abandoned_at_restore"] for r in abandoned} == {6}
    assert [r["step"] for r in harness.rows(workdir / "metrics.abandoned.jsonl", "summary")] == [8, 12]
    assert f"6 step row(s) and 2 summary row(s) of steps after 6 from an earlier run moved to " \
           f"{workdir}/metrics.abandoned.jsonl" in out


def test_on_corrupt_fail_and_a_bad_restore_step_exit_4_with_one_line(env, reference):
    workdir = harness.seed(reference["workdir"], env["base"] / "corrupt_fail", (6, 12))
    os.truncate(harness.largest_array_file(workdir / "checkpoints" / "12"), 1000)
    ckpts = workdir / "checkpoints"

    _, err = train(env, workdir, "--config.train.on_corrupt_checkpoint=fail", expect_rc=4)
    assert re.fullmatch(rf"unimedvl-train: error: checkpoint {ckpts}/12 is damaged: array \S+: OUT_OF_RANGE: .* "
                        rf"\(train\.on_corrupt_checkpoint=fail; set train\.on_corrupt_checkpoint=fallback to restore "
                        rf"the newest intact one, or pick one with train\.restore_step=6\)", err.strip()), err
    assert harness.entries(workdir) == ["12", "6", "restore_error.12.log"]  # nothing moved

    _, err = train(env, workdir, "--config.train.restore_step=9", expect_rc=4)
    assert err.strip() == (f"unimedvl-train: error: train.restore_step=9: {ckpts} holds no checkpoint 9 "
                           f"(checkpoints: 6, 12)")


def test_disk_full_ends_with_one_error_line_and_the_rerun_resumes(env, reference):
    workdir = harness.seed(reference["workdir"], env["base"] / "disk_full", (6,))
    ckpts = workdir / "checkpoints"
    limit = 1_000_000  # above the metrics / TensorBoard files, below the checkpoint's array file
    assert harness.largest_array_file(ckpts / "6").stat().st_size > limit
    every3 = "--config.train.checkpoint_every=3"  # saves at 9 and 12: the one at 9 fails in the background

    rc, out, err = harness.finish(harness.launch(env["cache"], env["data"], workdir, every3, "--sleep_after_step=0.5",
                                                 f"--fsize_limit_bytes={limit}", "--fsize_limit_after_checkpoint=6"))
    assert rc == 5, f"rc={rc}\n{out[-2000:]}\n{err[-4000:]}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-6000:]
    assert re.fullmatch(rf"unimedvl-train: error: checkpoint 9 could not be written: a file exceeds the process's "
                        rf"file-size limit \(RLIMIT_FSIZE\) \(EFBIG: File too large\) writing "
                        rf"{ckpts}/9\.orbax-checkpoint-tmp/\S+; a checkpoint needs up to \d+\.\d MB, "
                        rf"\d+\.\d [kMGT]B free; last intact checkpoint: 6 \({ckpts}/6\); rerunning the same command "
                        rf"resumes from it \(details: {ckpts}/save_error\.log\)", lines[0]), lines[0]
    stopped = max(r["step"] for r in harness.rows(workdir / "metrics.jsonl"))
    # Surfaced by a step after the failed save or, on a slow / loaded disk, at the latest when the next save (12)
    # waits for it; checkpoint 12 is never written (entries below).
    assert 9 <= stopped <= 12
    assert harness.entries(workdir) == ["6", "9.orbax-checkpoint-tmp", "save_error.log"]
    assert harness.committed(workdir, 6) and "File too large" in (ckpts / "save_error.log").read_text()

    out, err = train(env, workdir, every3)
    assert f"removed the partial checkpoint {ckpts}/9.orbax-checkpoint-tmp of an unfinished save" in out
    assert "restored checkpoint step 6" in out and "Traceback" not in err
    history = harness.rows(workdir / "metrics.jsonl")
    harness.assert_same_steps(history, reference["rows"], range(7, STEPS + 1))
    assert harness.entries(workdir) == ["12", "6", "9", "save_error.log"]


def test_kill_9_during_async_save_resumes_from_the_previous_checkpoint_exactly(env, reference):
    workdir = harness.seed(reference["workdir"], env["base"] / "killed_in_save", (6,))
    ckpts = workdir / "checkpoints"
    proc = harness.launch(env["cache"], env["data"], workdir, "--sleep_after_step=0.3")
    harness.wait_for(lambda: (ckpts / "12").exists() or any(ckpts.glob("12.orbax-checkpoint-tmp*/state*/ocdbt*/d/*")),
                     proc, "checkpoint 12's array files being written")
    proc.send_signal(signal.SIGSTOP)  # freeze every thread, then check the save is still unfinished
    assert not (ckpts / "12").exists(), "the save committed before the test could interrupt it"
    proc.kill()
    proc.wait(timeout=60)  # not communicate(): the data loader's worker processes may hold the pipes a while
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert harness.entries(workdir) == ["12.orbax-checkpoint-tmp", "6"]
    killed = harness.rows(workdir / "metrics.jsonl")
    assert [r["step"] for r in killed] == list(range(7, STEPS + 1))  # logged, then lost with the save

    out, err = train(env, workdir)
    assert f"removed the partial checkpoint {ckpts}/12.orbax-checkpoint-tmp of an unfinished save" in out
    assert "restored checkpoint step 6" in out and not err.strip()
    history = harness.rows(workdir / "metrics.jsonl")
    harness.assert_same_steps(history, reference["rows"], range(7, STEPS + 1))
    assert not {r["run"] for r in history} & {r["run"] for r in killed}
    assert harness.rows(workdir / "metrics.abandoned.jsonl") == [{**r, "abandoned_at_restore": 6} for r in killed]
    assert harness.entries(workdir) == ["12", "6"] and harness.committed(workdir, 12)


# --- in process: restore policies on copies of the reference checkpoints -----------------------------------------
@pytest.fixture(scope="module")
def target(env):
    """The abstract TrainState (on this process's one-device mesh) the trainer restores into."""
    sys.path.insert(0, str(harness.ROOT / "tests" / "train"))
    try:
        import loop_config
    finally:
        sys.path.pop(0)
    from unimedvl_jax.curriculum import StageSchedule
    from unimedvl_jax.train import checkpointing
    from unimedvl_jax.train.loop import Run, build_model_and_state
    from unimedvl_jax.train.train_config import total_steps

    cfg = loop_config.get_config()
    run = Run(cfg, str(env["base"]), lambda *_: None, StageSchedule.from_config(cfg.curriculum), total_steps(cfg))
    setup = build_model_and_state(run)
    return checkpointing.abstract_target(setup.abstract_state, setup.state_shardings)


def restore(directory, target, **kwargs):
    from unimedvl_jax.train.checkpointing import TrainCheckpointer

    ckpt = TrainCheckpointer(directory, every=6, keep=3)
    try:
        return ckpt.restore_verified(target, **kwargs)
    finally:
        ckpt.close()


def test_missing_commit_marker_is_skipped(env, reference, target):
    workdir = harness.seed(reference["workdir"], env["base"] / "no_marker", (6, 12))
    ckpts = workdir / "checkpoints"
    (ckpts / "12" / "commit_success.txt").unlink()
    restored = restore(ckpts, target)
    assert restored.step == 6 and int(restored.state.step) == 6
    assert restored.notes == [f"checkpoint 12 is damaged (no commit marker commit_success.txt (its save never "
                              f"finished)); moved it to {ckpts}/12.corrupt and restored checkpoint 6 instead"]
    assert harness.entries(workdir) == ["12.corrupt", "6"]
    saved = json.loads((ckpts / "6" / "data" / "metadata").read_text())  # the data item of the restored step
    assert restored.data["states"] == saved["states"] and restored.data["batch_packs"] == 2


def test_restore_step_picks_a_checkpoint_and_sets_newer_ones_aside(env, reference, target):
    from unimedvl_jax.train.checkpoint_faults import CheckpointRestoreError

    workdir = harness.seed(reference["workdir"], env["base"] / "restore_step", (6, 12))
    ckpts = workdir / "checkpoints"
    restored = restore(ckpts, target, step=6)
    assert restored.step == 6 and int(restored.state.step) == 6
    assert restored.notes == [f"train.restore_step=6: moved the newer checkpoint 12 to {ckpts}/12.abandoned "
                              f"(training continues from step 6; drop train.restore_step for later restarts)"]
    assert harness.entries(workdir) == ["12.abandoned", "6"]

    workdir = harness.seed(reference["workdir"], env["base"] / "restore_step_damaged", (6, 12))
    ckpts = workdir / "checkpoints"
    os.truncate(harness.largest_array_file(ckpts / "12"), 1000)
    with pytest.raises(CheckpointRestoreError, match=rf"^checkpoint {ckpts}/12 \(train\.restore_step=12\) is "
                                                     rf"damaged: array \S+: OUT_OF_RANGE") as e:
        restore(ckpts, target, step=12, on_corrupt="fallback")  # an explicit step never falls back
    assert e.value.exit_status == 4 and harness.entries(workdir) == ["12", "6", "restore_error.12.log"]


def test_no_intact_checkpoint_is_an_error_and_every_damaged_one_is_kept(env, reference, target):
    from unimedvl_jax.train.checkpoint_faults import CheckpointRestoreError

    workdir = harness.seed(reference["workdir"], env["base"] / "all_damaged", (6, 12))
    ckpts = workdir / "checkpoints"
    (ckpts / "12" / "state" / "commit_success.txt").unlink()
    (ckpts / "6" / "data" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointRestoreError) as e:
        restore(ckpts, target)
    message = str(e.value)
    assert message.startswith(f"no intact checkpoint in {ckpts}: 12 (no commit marker state/commit_success.txt "
                              f"(its save never finished)) moved to {ckpts}/12.corrupt; 6 (")
    assert message.endswith(f") moved to {ckpts}/6.corrupt. Rerunning starts from step 0; to retry one, rename it "
                            f"back to its step number")
    assert harness.entries(workdir) == ["12.corrupt", "6.corrupt", "restore_error.6.log"]


# --- units ---------------------------------------------------------------------------------------------------
def test_space_warning_compares_the_kept_checkpoints_with_the_free_space(tmp_path):
    import jax
    import numpy as np

    from unimedvl_jax.train import checkpoint_faults as faults

    state = {"w": jax.ShapeDtypeStruct((1000, 1000), np.float32), "b": jax.ShapeDtypeStruct((10,), jax.numpy.bfloat16)}
    assert faults.checkpoint_nbytes(state) == 4_000_020
    free = faults.free_bytes(str(tmp_path / "not" / "yet"))  # the nearest existing ancestor's filesystem
    assert free > 0
    big = free // 3 + 1  # 4 (or 3) never fit, 2 always do
    warning = faults.space_warning(str(tmp_path), big, keep=3, existing=0, saves_left=10)
    assert re.fullmatch(rf"checkpoints of this run need up to {faults.human(big)} each; train\.keep_checkpoints=3 "
                        rf"\+ the one being written need {faults.human(4 * big)} more but {tmp_path} has \d+\.\d "
                        rf"[kMGT]B free: saves will fail once the disk is full", warning), warning
    assert faults.space_warning(str(tmp_path), big, keep=3, existing=3, saves_left=10) is None  # one more fits
    assert faults.space_warning(str(tmp_path), big, keep=3, existing=0, saves_left=2) is None  # two saves left
    assert "every checkpoint (train.keep_checkpoints=0)" in faults.space_warning(str(tmp_path), big, keep=0,
                                                                                 existing=5, saves_left=4)
    assert faults.space_warning(str(tmp_path), 1, keep=3, existing=0, saves_left=10) is None


def read_session_starts(tb_dir):
    """Steps of the SessionLog.START (purge) events in a TensorBoard directory."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in pathlib.Path(tb_dir).glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps.append(event.step)
    return steps


def test_metrics_rewind_moves_later_and_torn_rows(tmp_path):
    from unimedvl_jax.train import metrics_history

    def row(kind, step):
        return json.dumps({"kind": kind, "run": "a", "step": step}) + "\n"

    (tmp_path / "tb").mkdir()
    kept = [row("step", s) for s in range(1, 7)] + [row("summary", 4)]
    later = [row("step", s) for s in range(7, 10)] + [row("summary", 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(kept[:4] + [kept[6]] + kept[4:6] + later) + '{"kind": "st')
    note = metrics_history.rewind(str(tmp_path), 6, 0)
    assert note == (f"metrics: 3 step row(s) and 1 summary row(s) of steps after 6 from an earlier run moved to "
                    f"{tmp_path}/metrics.abandoned.jsonl")
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(kept[:4] + [kept[6]] + kept[4:6])
    moved = [json.loads(line) for line in (tmp_path / "metrics.abandoned.jsonl").read_text().splitlines()]
    assert [(r["kind"], r.get("step")) for r in moved] == [("step", 7), ("step", 8), ("step", 9), ("summary", 8),
                                                          ("torn", None)]
    assert moved[-1]["text"] == '{"kind": "st' and {r["abandoned_at_restore"] for r in moved} == {6}
    assert read_session_starts(tmp_path / "tb") == [7]  # TensorBoard hides its summaries of steps >= 7
    assert metrics_history.rewind(str(tmp_path), 6, 0) is None  # nothing left to move

    (tmp_path / "metrics.process1.jsonl").write_text("".join(kept))  # process k > 0: its own file
    assert "3 step row(s)" in metrics_history.rewind(str(tmp_path), 3, 1)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.process1.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    assert (tmp_path / "metrics.process1.abandoned.jsonl").exists()
