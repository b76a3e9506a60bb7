"""Faults of one process of a multi-process job: 2 processes × 4 simulated CPU devices (launch/local.py's
environment for each process, started here so that one can be killed or limited) train tests/launch/dist_config.py
(8 steps, checkpoints every 3) with UNIMEDVL_HEARTBEAT_TIMEOUT=15, in one workdir:

1. process 1 alone fails (RLIMIT_FSIZE of 8 kB once checkpoint 3 has committed: writing its metrics.process1.jsonl
   raises EFBIG): it exits 1 with that error; process 0, waiting in a collective for it, exits 6 naming process 1
   and its error (distributed.leave_job) within a heartbeat interval, not at the timeout.
2. the rerun resumes from checkpoint 3; process 1 is killed (-9) once checkpoint 6 has committed: process 0 exits
   within the timeout with status 6 and one line naming process 1 (its heartbeat watcher; the collective it waits
   in never completes).
3. the rerun resumes from checkpoint 6; process 0 (the coordinator) is killed: process 1 ends within the timeout
   (JAX's coordination client aborts it at once when the coordinator's connection drops, naming the leader task;
   our watcher would name process 0 at the timeout otherwise).
4. the rerun resumes from checkpoint 6 and finishes; metrics.jsonl holds each step once."""

import subprocess
import sys
import time

import harness
import pytest

sys.path.insert(0, str(harness.ROOT))
from launch.local import free_port, process_env  # noqa: E402

sys.path.pop(0)

HEARTBEAT_TIMEOUT = 15
STEPS = 8


def start_job(env, workdir, *flags, process1=()):
    """Both processes of the job, with launch/local.py's per-process environment (`process1`: flags of process 1
    only)."""
    base = harness.base_env(env["cache"])
    base["XLA_FLAGS"] = harness.FAST_XLA
    base["UNIMEDVL_HEARTBEAT_TIMEOUT"] = str(HEARTBEAT_TIMEOUT)
    port = free_port()
    return [harness.launch(env["cache"], env["data"], workdir, *flags, *(process1 if i else ()),
                           config=harness.DIST_CONFIG,
                           env=process_env(base, index=i, count=2, port=port, devices=4, platform="cpu",
                                           init_timeout=120))
            for i in range(2)]


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def kill_when_committed(procs, workdir, step, victim):
    """SIGKILL process `victim` once checkpoint `step` has committed; (survivor's rc, stdout, stderr, seconds from
    the kill to its exit, victim's stdout)."""
    survivor = procs[1 - victim]
    harness.wait_for(lambda: harness.committed(workdir, step), survivor, f"checkpoint {step}", poll=0.05)
    procs[victim].kill()
    killed_at = time.time()
    victim_out, _ = procs[victim].communicate(timeout=60)
    try:
        out, err = survivor.communicate(timeout=HEARTBEAT_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail(f"process {1 - victim} still runs {HEARTBEAT_TIMEOUT + 60} s after process {victim} was killed")
    return survivor.returncode, out, err, time.time() - killed_at, victim_out


@pytest.fixture(scope="module")
def env(tmp_path_factory, unimed_mini_dir):
    base = tmp_path_factory.mktemp("lost")
    return {"data": unimed_mini_dir, "cache": base / "jax_cache", "base": base}


def test_a_failed_or_lost_process_ends_the_job_in_bounded_time_and_the_rerun_finishes(env):
    workdir = env["base"] / "job"

    procs = start_job(env, workdir, "--sleep_after_step=0.5",
                      process1=("--fsize_limit_bytes=8000", "--fsize_limit_after_checkpoint=3"))
    rc1, _, err1 = harness.finish(procs[1])
    failed_at = time.time()
    rc0, _, err0 = harness.finish(procs[0], timeout=HEARTBEAT_TIMEOUT + 60)
    assert (rc0, rc1) == (6, 1), (err0[-3000:], err1[-3000:])
    assert time.time() - failed_at < HEARTBEAT_TIMEOUT - 5  # told by process 1, not found out by the timeout
    assert last_line(err1) == "OSError: [Errno 27] File too large", err1[-3000:]
    assert last_line(err0) == (f"unimedvl: error: process 1 of 2 failed: OSError: [Errno 27] File too large; process 0 "
                               f"stops too (UNIMEDVL_HEARTBEAT_TIMEOUT={HEARTBEAT_TIMEOUT} s). Rerun the job: it "
                               f"resumes from the last checkpoint."), last_line(err0)
    assert harness.committed(workdir, 3) and not harness.committed(workdir, 6)
    first_run = harness.rows(workdir / "metrics.jsonl")[0]["run"]

    procs = start_job(env, workdir, "--sleep_after_step=1")
    rc, out, err, seconds, _ = kill_when_committed(procs, workdir, 6, victim=1)
    assert "restored checkpoint step 3" in out
    assert rc == 6, err[-4000:]
    assert seconds < HEARTBEAT_TIMEOUT + 10, seconds
    assert last_line(err) == (f"unimedvl: error: process 1 of 2 stopped sending heartbeats (none for "
                              f"{HEARTBEAT_TIMEOUT} s): killed, crashed or its host is gone; process 0 stops too "
                              f"(UNIMEDVL_HEARTBEAT_TIMEOUT={HEARTBEAT_TIMEOUT} s). Rerun the job: it resumes from the "
                              f"last checkpoint."), last_line(err)

    earlier = {r["run"] for r in harness.rows(workdir / "metrics.process1.jsonl")}
    procs = start_job(env, workdir, "--sleep_after_step=1")
    harness.wait_for(lambda: any(r["run"] not in earlier for r in harness.rows(workdir / "metrics.process1.jsonl")),
                     procs[1], "the rerun's first step", poll=0.05)
    rc, _, err, seconds, victim_out = kill_when_committed(procs, workdir, 6, victim=0)
    assert "restored checkpoint step 6" in victim_out
    assert rc != 0 and seconds < HEARTBEAT_TIMEOUT + 10, (rc, seconds, err[-4000:])
    assert ("lost contact with the coordinator (process 0" in err
            or "leader task was preempted/died" in err), err[-4000:]

    procs = start_job(env, workdir)
    outs = [harness.finish(p) for p in procs]
    assert [rc for rc, _, _ in outs] == [0, 0], [err[-3000:] for _, _, err in outs]
    out = outs[0][1]
    assert "restored checkpoint step 6" in out and "unimedvl-train: done at step 8" in out
    for name in ("metrics.jsonl", "metrics.process1.jsonl"):  # one row per step, each from the run that led here
        history = harness.rows(workdir / name)
        assert [r["step"] for r in history] == list(range(1, STEPS + 1)), name
        runs = [r["run"] for r in history]
        assert len(set(runs[:3])) == len(set(runs[3:6])) == len(set(runs[6:])) == 1, runs
        assert len({runs[0], runs[3], runs[6]}) == 3, runs
    assert harness.rows(workdir / "metrics.jsonl")[0]["run"] == first_run
