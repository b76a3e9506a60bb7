"""launch/: the TPU pod launcher's --dry-run commands (command by command), the SLURM batch script (bash -n,
shellcheck when installed, a run against a stub `srun` whose recorded command and environment are checked,
including that XLA accepts its XLA_FLAGS), the GKE JobSet manifests (parsed, replica counts), and the environment
launch/local.py gives each CPU process."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
sys.path.insert(0, str(ROOT))
from launch.local import process_env  # noqa: E402

sys.path.pop(0)


# --- TPU pod -----------------------------------------------------------------------------------------------
def dry_run(*args):
    args = list(args)
    k = args.index("--") if "--" in args else len(args)
    out = subprocess.run([sys.executable, str(LAUNCH / "tpu_pod.py"), *args[:k], "--dry-run", *args[k:]],
                         capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def test_tpu_pod_dry_run_single_slice():
    cmds = dry_run("--name", "um-v5p32", "--zone", "us-east5-a", "--project", "proj", "--accelerator", "v5p-32",
                   "--spot", "--repo", "https://example.com/unimedvl_jax.git", "--ref", "v1.0",
                   "--setup", "sudo mount -t nfs 10.0.0.2:/share /mnt/shared", "--workdir", "/mnt/shared/runs/a",
                   "--after", "delete", "--", "--config=configs/unimedvl_14b.py", "--config.mesh.shape=(1,-1,1)")
    loc = ["--zone=us-east5-a", "--project=proj"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "um-v5p32", *loc, "--worker=all"]
    assert cmds == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "um-v5p32", *loc, "--format=value(state)"],
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "um-v5p32", *loc, "--accelerator-type=v5p-32",
         "--version=v2-alpha-tpuv5", "--spot"],
        [*ssh, "--command=test -d ~/unimedvl_jax/.git || git clone --quiet https://example.com/unimedvl_jax.git "
               "~/unimedvl_jax && git -C ~/unimedvl_jax fetch --quiet origin v1.0 && "
               "git -C ~/unimedvl_jax checkout --quiet --force FETCH_HEAD"],
        [*ssh, "--command=python3 -m venv ~/unimedvl-venv && ~/unimedvl-venv/bin/pip install --quiet --upgrade pip "
               "&& ~/unimedvl-venv/bin/pip install --quiet -e ~/unimedvl_jax 'jax[tpu]>=0.10,<0.11'"],
        [*ssh, "--command=sudo mount -t nfs 10.0.0.2:/share /mnt/shared"],
        [*ssh, "--command=cd ~/unimedvl_jax && UNIMEDVL_INIT_TIMEOUT=600 ~/unimedvl-venv/bin/unimedvl-train "
               "--config=configs/unimedvl_14b.py '--config.mesh.shape=(1,-1,1)' --workdir=/mnt/shared/runs/a"],
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "um-v5p32", *loc, "--quiet"],
    ]


def test_tpu_pod_dry_run_multi_slice_copy_detach():
    cmds = dry_run("--name", "ms", "--zone", "us-east5-a", "--accelerator", "v5p-32", "--num-slices", "2",
                   "--code", "copy", "--skip-install", "--workdir", "/mnt/w", "--detach", "--env", "FOO=a b",
                   "--after", "delete", "--", "--config=configs/tiny.py", "--config.mesh.shape=(2,-1,1)")
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    all_ = ["--zone=us-east5-a", "--node=all", "--worker=all"]
    train = ("cd ~/unimedvl_jax && UNIMEDVL_INIT_TIMEOUT=600 FOO='a b' ~/unimedvl-venv/bin/unimedvl-train "
             "--config=configs/tiny.py '--config.mesh.shape=(2,-1,1)' '--config.mesh.dcn_shape=(2,1,1)' "
             "--workdir=/mnt/w")
    assert cmds == [
        [*qr, "describe", "ms-qr", "--zone=us-east5-a", "--format=value(state.state)"],
        [*qr, "create", "ms-qr", "--zone=us-east5-a", "--accelerator-type=v5p-32",
         "--runtime-version=v2-alpha-tpuv5", "--node-count=2", "--node-prefix=ms"],
        [*qr, "describe", "ms-qr", "--zone=us-east5-a", "--format=value(state.state)"],
        ["git", "archive", "--format=tar.gz", "--output=/tmp/unimedvl_jax.tar.gz", "HEAD"],
        [*qr, "scp", "/tmp/unimedvl_jax.tar.gz", "ms-qr:~/unimedvl_jax.tar.gz", *all_],
        [*qr, "ssh", "ms-qr", *all_, "--command=rm -rf ~/unimedvl_jax && mkdir -p ~/unimedvl_jax && "
                                     "tar -xzf ~/unimedvl_jax.tar.gz -C ~/unimedvl_jax"],
        [*qr, "ssh", "ms-qr", *all_, f"--command=nohup bash -c {shlex.quote(train)} > ~/unimedvl-train.log 2>&1 &"],
        [*qr, "ssh", "ms-qr", "--zone=us-east5-a", "--command=tail -n +1 -F ~/unimedvl-train.log", "--worker=0"],
        [*qr, "delete", "ms-qr", "--zone=us-east5-a", "--force", "--quiet"],
    ]
    # the remote shell gets exactly the trainer command back from the quoted `bash -c` argument
    remote = shlex.split(cmds[6][-1].removeprefix("--command="))
    assert remote[:3] == ["nohup", "bash", "-c"] and remote[3] == train


def test_tpu_pod_rejects_bad_combinations():
    base = [sys.executable, str(LAUNCH / "tpu_pod.py"), "--name", "x", "--zone", "z", "--workdir", "/w",
            "--dry-run"]
    bad = subprocess.run([*base, "--accelerator", "v5p-32", "--num-slices", "2", "--after", "stop", "--code",
                          "copy"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "queued resource can only be deleted" in bad.stderr
    no_repo = subprocess.run([*base, "--accelerator", "v5p-32"], capture_output=True, text=True)
    assert no_repo.returncode != 0 and "--code git needs --repo" in no_repo.stderr
    unknown = subprocess.run([*base, "--accelerator", "v9z-8", "--code", "copy"], capture_output=True, text=True)
    assert unknown.returncode != 0 and "pass --runtime-version" in unknown.stderr


# --- SLURM ------------------------------------------------------------------------------------------------
def test_sbatch_syntax():
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], check=True)
    if shutil.which("shellcheck"):  # not installed on every machine; bash -n above always runs
        subprocess.run(["shellcheck", "-S", "warning", str(LAUNCH / "slurm.sbatch")], check=True)
    directives = [line.split()[1] for line in (LAUNCH / "slurm.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@300", "--requeue"} <= set(
        directives)


def test_sbatch_runs_the_trainer_under_srun(tmp_path):
    """Run the batch script with a stub `srun` that records its arguments and environment."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD.args"\nenv > "$RECORD.env"\n')
    (stub / "srun").chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export VENV_ACTIVATED=1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNIMEDVL_", "XLA_", "NCCL_"))}
    env.update(PATH=f"{stub}:{env['PATH']}", RECORD=str(tmp_path / "srun"), REPO=str(ROOT), VENV=str(venv),
               WORKDIR=str(tmp_path / "run"), SLURM_JOB_ID="777", SLURM_JOB_NAME="unimedvl",
               SLURM_JOB_NODELIST="h200-[01-02]", SLURM_NTASKS="2", TRAIN_ARGS="--config.train.batch_packs=32")
    subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], env=env, check=True, capture_output=True, text=True)
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args == ["--kill-on-bad-exit=1", "--label", "--cpu-bind=none", "python", "-m", "unimedvl_jax.train_cli",
                    "--config=configs/unimedvl_14b.py", f"--workdir={tmp_path / 'run'}",
                    "--config.mesh.shape=(1,-1,1)", "--config.mesh.rules=fsdp", "--config.train.batch_packs=32"]
    recorded = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert recorded["VENV_ACTIVATED"] == "1" and (tmp_path / "run").is_dir()
    assert recorded["UNIMEDVL_COORDINATOR_PORT"] == str(20000 + 777) and recorded["UNIMEDVL_INIT_TIMEOUT"] == "600"
    assert recorded["NCCL_NVLS_ENABLE"] == "1" and recorded["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
    flags = recorded["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and len(flags) == 9
    # every flag is one XLA knows (an unknown flag aborts the process when the backend starts)
    check = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                           env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=recorded["XLA_FLAGS"]),
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == "cpu", check.stderr[-2000:]


# --- GKE JobSets --------------------------------------------------------------------------------------------
def load(name):
    docs = list(yaml.safe_load_all((LAUNCH / name).read_text()))
    assert len(docs) == 1 and docs[0]["kind"] == "JobSet" and docs[0]["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    return docs[0]


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_jobset_tpu_v5p32():
    js = load("gke_jobset_tpu.yaml")
    (rj,) = js["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    pod = job["template"]["spec"]
    (c,) = pod["containers"]
    assert rj["replicas"] == 1 and job["parallelism"] == job["completions"] == 4
    assert job["completionMode"] == "Indexed" and pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice", "cloud.google.com/gke-tpu-topology": "2x2x4"}
    chips = 2 * 2 * 4
    assert c["resources"]["limits"]["google.com/tpu"] * job["parallelism"] == chips
    assert c["command"] == ["unimedvl-train"] and any(a.startswith("--workdir=/shared/") for a in c["args"])
    env = env_of(c)
    name = js["metadata"]["name"]
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == f"{name}-{rj['name']}-0-0.{name}"
    assert "UNIMEDVL_COORDINATOR_ADDRESS" not in env  # TPU: JAX's own detection
    assert pod["terminationGracePeriodSeconds"] >= 60


def test_jobset_gpu_2x8_h200():
    js = load("gke_jobset_gpu.yaml")
    (rj,) = js["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    (c,) = job["template"]["spec"]["containers"]
    assert rj["replicas"] == 1 and job["parallelism"] == job["completions"] == 2
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = env_of(c)
    name = js["metadata"]["name"]
    assert int(env["UNIMEDVL_NUM_PROCESSES"]) == rj["replicas"] * job["parallelism"]
    host, port = env["UNIMEDVL_COORDINATOR_ADDRESS"].rsplit(":", 1)
    assert host == f"{name}-{rj['name']}-0-0.{name}" and {"containerPort": int(port)} in c["ports"]
    assert env["UNIMEDVL_PROCESS_ID"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    from unimedvl_jax.distributed import detect

    spec = detect({"UNIMEDVL_COORDINATOR_ADDRESS": env["UNIMEDVL_COORDINATOR_ADDRESS"],
                   "UNIMEDVL_NUM_PROCESSES": env["UNIMEDVL_NUM_PROCESSES"], "UNIMEDVL_PROCESS_ID": "1"})
    assert (spec.kind, spec.num_processes, spec.process_id) == ("env", 2, 1)
    assert "--config.mesh.shape=(2,-1,1)" in c["args"]


# --- local processes ----------------------------------------------------------------------------------------
def test_local_cpu_processes_get_devices_and_huge_page_malloc():
    """CPU processes get their device count and glibc's huge-page malloc (a user's other tunables kept, a user's own
    hugetlb setting left alone); GPU processes get neither."""
    def env(base, platform="cpu"):
        return process_env(base, index=1, count=2, port=1234, devices=4, platform=platform, init_timeout=60)

    cpu = env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --foo"})
    assert cpu["XLA_FLAGS"].split() == ["--foo", "--xla_force_host_platform_device_count=4"]
    assert cpu["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert cpu["UNIMEDVL_PROCESS_ID"] == "1" and cpu["UNIMEDVL_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    gpu = env({}, platform="gpu")
    assert "GLIBC_TUNABLES" not in gpu and gpu["UNIMEDVL_LOCAL_DEVICE_IDS"] == "4,5,6,7"
