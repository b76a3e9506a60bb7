"""unimedvl_jax/distributed.py: cluster detection from simulated environments (SLURM, explicit variables, TPU),
and initialisation failures that must end quickly with a clear error (loopback
only: an unreachable coordinator, a process that never arrives)."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from unimedvl_jax import distributed as dist
from unimedvl_jax.distributed import DistributedInitError

ROOT = pathlib.Path(__file__).resolve().parents[1]

SLURM_2_NODES = {  # srun step of `sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8`, task on node 2
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "h200-[07-08]", "SLURM_JOB_NODELIST": "h200-[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
}


def test_hostlist_expansion():
    assert dist.expand_hostlist("h200-[07-08]") == ["h200-07", "h200-08"]
    assert dist.expand_hostlist("node001") == ["node001"]
    assert dist.expand_hostlist("gpu[001-003,010],login-[1-2]-ib") == [
        "gpu001", "gpu002", "gpu003", "gpu010", "login-1-ib", "login-2-ib"]
    assert dist.expand_hostlist("a[1-2]b[3-4]") == ["a1b3", "a1b4", "a2b3", "a2b4"]


def test_slurm_one_process_per_node():
    spec = dist.detect(SLURM_2_NODES)
    assert spec.kind == "slurm" and spec.multi_process
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("h200-07:61586", 2, 1)
    assert spec.local_device_ids is None  # the process drives all 8 GPUs of its node
    env = dict(SLURM_2_NODES, UNIMEDVL_COORDINATOR_PORT="23456")
    assert dist.detect(env).coordinator_address == "h200-07:23456"


def test_slurm_matches_jax_own_detection(monkeypatch):
    """Same coordinator / process count / id as jax._src.clusters.SlurmCluster for the same variables."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in SLURM_2_NODES.items():
        monkeypatch.setenv(key, value)
    assert SlurmCluster.is_env_present()
    spec = dist.detect(SLURM_2_NODES)
    assert spec.coordinator_address == SlurmCluster.get_coordinator_address(None, None)
    assert (spec.num_processes, spec.process_id) == (SlurmCluster.get_process_count(),
                                                     SlurmCluster.get_process_id())


def test_slurm_one_process_per_gpu():
    env = dict(SLURM_2_NODES, SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16",
               SLURM_STEP_TASKS_PER_NODE="8(x2)")
    spec = dist.detect(env)
    assert (spec.num_processes, spec.process_id, spec.local_device_ids) == (16, 11, (3,))
    # SLURM already bound the task's GPU (--gpus-per-task=1): the process sees one device, use it
    assert dist.detect(dict(env, CUDA_VISIBLE_DEVICES="3")).local_device_ids is None
    # 4 tasks per node × 2 GPUs each
    env4 = dict(env, SLURM_LOCALID="1", SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_GPUS_PER_TASK="2")
    assert dist.detect(env4).local_device_ids == (2, 3)
    assert dist.detect(dict(env4, UNIMEDVL_LOCAL_DEVICE_IDS="6,7")).local_device_ids == (6, 7)


def test_slurm_single_task_or_batch_shell_is_single_process():
    one = dict(SLURM_2_NODES, SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")
    assert dist.detect(one).kind == "single"
    batch_shell = {k: v for k, v in SLURM_2_NODES.items() if not k.startswith("SLURM_STEP")}
    assert dist.detect(batch_shell).kind == "single"  # not inside srun: warned, runs as one process
    assert dist.detect(dict(SLURM_2_NODES, UNIMEDVL_DISTRIBUTED="off")).kind == "single"


def test_explicit_variables_win_and_are_checked():
    env = dict(SLURM_2_NODES, UNIMEDVL_COORDINATOR_ADDRESS="10.0.0.5:1234", UNIMEDVL_NUM_PROCESSES="4",
               UNIMEDVL_PROCESS_ID="3", UNIMEDVL_LOCAL_DEVICE_IDS="4, 5,6,7")
    spec = dist.detect(env)
    assert (spec.kind, spec.coordinator_address, spec.num_processes, spec.process_id, spec.local_device_ids) == (
        "env", "10.0.0.5:1234", 4, 3, (4, 5, 6, 7))
    with pytest.raises(DistributedInitError, match="UNIMEDVL_PROCESS_ID is not"):
        dist.detect({"UNIMEDVL_COORDINATOR_ADDRESS": "h:1", "UNIMEDVL_NUM_PROCESSES": "2"})
    with pytest.raises(DistributedInitError, match=r"process id 2 not in \[0, 2\)"):
        dist.detect({"UNIMEDVL_COORDINATOR_ADDRESS": "h:1", "UNIMEDVL_NUM_PROCESSES": "2",
                     "UNIMEDVL_PROCESS_ID": "2"})
    with pytest.raises(DistributedInitError, match="is not host:port"):
        dist.detect({"UNIMEDVL_COORDINATOR_ADDRESS": "h", "UNIMEDVL_NUM_PROCESSES": "2",
                     "UNIMEDVL_PROCESS_ID": "0"})
    with pytest.raises(DistributedInitError, match="UNIMEDVL_LOCAL_DEVICE_IDS='0,x'"):
        dist.detect({"UNIMEDVL_COORDINATOR_ADDRESS": "h:1", "UNIMEDVL_NUM_PROCESSES": "2",
                     "UNIMEDVL_PROCESS_ID": "0", "UNIMEDVL_LOCAL_DEVICE_IDS": "0,x"})
    with pytest.raises(DistributedInitError, match="no slurm environment"):
        dist.detect({"UNIMEDVL_DISTRIBUTED": "slurm"})
    one = {"UNIMEDVL_COORDINATOR_ADDRESS": "h:1", "UNIMEDVL_NUM_PROCESSES": "1", "UNIMEDVL_PROCESS_ID": "0"}
    assert dist.detect(one).kind == "single"


def test_tpu_detection():
    gke = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}
    spec = dist.detect_tpu(gke, tpu_chips=0)
    assert spec.kind == "tpu" and spec.num_processes == 4
    assert dist.detect_tpu(dict(gke, MEGASCALE_NUM_SLICES="2"), tpu_chips=0).num_processes == 8
    assert dist.detect_tpu({"TPU_WORKER_HOSTNAMES": "w-0"}, tpu_chips=4) is None  # single host
    assert dist.detect_tpu({}, tpu_chips=4).kind == "tpu"  # a TPU VM: JAX asks the metadata server
    assert dist.detect_tpu({}, tpu_chips=0) is None
    assert dist.detect({}).kind == "single"  # this machine: no TPU, no SLURM, no variables


def test_timeout_setting():
    assert dist.timeout_from_env({}) == dist.DEFAULT_TIMEOUT_S
    assert dist.timeout_from_env({"UNIMEDVL_INIT_TIMEOUT": "7.5"}) == 7.5
    with pytest.raises(DistributedInitError, match="UNIMEDVL_INIT_TIMEOUT"):
        dist.timeout_from_env({"UNIMEDVL_INIT_TIMEOUT": "soon"})


def test_single_process_initialize_is_a_no_op(monkeypatch):
    import jax

    monkeypatch.setattr(dist, "_INITIALIZED", None)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("must not initialise"))
    assert dist.initialize(env={}).kind == "single"
    assert jax.process_count() == 1


# --- failures end quickly with a clear error (subprocesses: a failed handshake ends the process) --------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(env_vars, *args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env_vars)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "unimedvl_jax.train_cli", "--config=configs/tiny.py",
                           "--workdir=/nonexistent/never-created", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.time() - start


def test_unreachable_coordinator_fails_with_clear_error():
    port = _free_port()  # nothing listens there
    proc, seconds = _run_cli({"UNIMEDVL_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "UNIMEDVL_NUM_PROCESSES": "2",
                              "UNIMEDVL_PROCESS_ID": "1"}, "--init_timeout=3")
    assert proc.returncode == dist.INIT_TIMEOUT_EXIT, proc.stderr[-3000:]
    assert (f"unimedvl-train: error: process 1 of 2 (env), timeout 3 s: the coordinator 127.0.0.1:{port} was not "
            f"reachable") in proc.stderr
    assert seconds < 3 + 30, seconds  # 3 s of waiting + interpreter / import start-up


def test_missing_process_fails_with_clear_error():
    port = _free_port()
    proc, seconds = _run_cli({"UNIMEDVL_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "UNIMEDVL_NUM_PROCESSES": "2",
                              "UNIMEDVL_PROCESS_ID": "0", "UNIMEDVL_INIT_TIMEOUT": "3"})
    assert proc.returncode == dist.INIT_TIMEOUT_EXIT, proc.stderr[-3000:]
    assert (f"unimedvl: error: process 0 of 2 (env): not all 2 processes connected to the coordinator "
            f"127.0.0.1:{port} started by this process within 3 s (UNIMEDVL_INIT_TIMEOUT)") in proc.stderr
    assert seconds < 3 + 30, seconds


def test_multi_slice_mesh_keeps_slices_in_dcn_blocks():
    import dataclasses

    import jax

    from unimedvl_jax.sharding import hybrid_device_grid, make_mesh

    @dataclasses.dataclass(frozen=True)
    class Dev:  # what mesh_utils reads of a device
        id: int
        process_index: int
        slice_index: int | None
        platform: str
        device_kind: str
    devices = [Dev(i, i // 4, i // 8, "cpu", "cpu") for i in range(16)]  # 2 slices × 2 hosts × 4 devices
    grid = hybrid_device_grid([2, 8, 1], [2, 1, 1], devices)  # data over DCN, fsdp inside a slice
    assert grid.shape == (2, 8, 1)
    assert [{d.slice_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]
    grid = hybrid_device_grid([4, 4, 1], [2, 1, 1], devices)
    assert [{d.slice_index for d in grid[i].ravel()} for i in range(4)] == [{0}, {0}, {1}, {1}]
    no_slices = [Dev(i, i // 4, None, "cpu", "cpu") for i in range(8)]  # processes stand for slices
    grid = hybrid_device_grid([2, 4, 1], [2, 1, 1], no_slices)
    assert [{d.process_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]
    with pytest.raises(ValueError, match=r"mesh.dcn_shape \(4, 1, 1\) needs 4 slices, have 2"):
        hybrid_device_grid([4, 4, 1], [4, 1, 1], devices)
    with pytest.raises(ValueError, match="must divide mesh.shape"):
        hybrid_device_grid([3, 4, 1], [2, 1, 1], devices)
    mesh = make_mesh((1, -1, 1), dcn_shape=(1, 1, 1))  # one slice: the plain jax.make_mesh path
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
