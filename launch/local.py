#!/usr/bin/env python3
"""Start N JAX processes of one job on this machine (127.0.0.1), each with its own simulated CPU devices (or
its own GPUs), joined through unimedvl_jax.distributed's explicit UNIMEDVL_* variables.

    python launch/local.py -n 2 -d 4 -- --config configs/tiny.py --workdir runs/local2x4 \\
        --config.mesh.shape="(2,2,2)" --config.train.batch_packs=8
    python launch/local.py -n 2 -d 4 -- python my_script.py          # any command

A command that starts with a flag is given to the trainer (`python -m unimedvl_jax.train_cli`). Each process
gets UNIMEDVL_COORDINATOR_ADDRESS=127.0.0.1:<port>, UNIMEDVL_NUM_PROCESSES, UNIMEDVL_PROCESS_ID,
UNIMEDVL_INIT_TIMEOUT and, with --platform cpu (default), JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=<d> and GLIBC_TUNABLES with glibc.malloc.hugetlb=1 (unless set);
with --platform gpu, UNIMEDVL_LOCAL_DEVICE_IDS=<its d GPUs>.
Output lines are prefixed with [p<i>] (and copied to <log_dir>/process_<i>.log with --log_dir). When a process
fails, the others get --grace seconds and are then terminated. SIGTERM / SIGINT to this launcher is forwarded
to every process (a preemption: the trainer saves a checkpoint and exits 0). Exit status: the first non-zero
status of a process, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

TRAINER = [sys.executable, "-m", "unimedvl_jax.train_cli"]
# XLA:CPU allocates each execution's temporary buffer afresh (one mmap the size of the step's activations) and every
# page of it faults on first touch; glibc then backs it with transparent huge pages (README, "CPU host memory").
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_huge_page_malloc(tunables: str) -> str:
    """GLIBC_TUNABLES plus huge-page-backed malloc, unless it already sets glibc.malloc.hugetlb."""
    if "glibc.malloc.hugetlb" in tunables:
        return tunables
    return ":".join(t for t in (tunables, HUGE_PAGE_MALLOC) if t)


def process_env(base: dict, *, index: int, count: int, port: int, devices: int, platform: str,
                init_timeout: float) -> dict:
    """The environment of process `index` (see module docstring)."""
    env = dict(base)
    env.update(UNIMEDVL_DISTRIBUTED="env", UNIMEDVL_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               UNIMEDVL_NUM_PROCESSES=str(count), UNIMEDVL_PROCESS_ID=str(index),
               UNIMEDVL_INIT_TIMEOUT=str(init_timeout), PYTHONUNBUFFERED="1")
    if platform == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(
            "--xla_force_host_platform_device_count")]
        env.update(JAX_PLATFORMS="cpu",
                   XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
                   GLIBC_TUNABLES=with_huge_page_malloc(env.get("GLIBC_TUNABLES", "")))
        env.pop("UNIMEDVL_LOCAL_DEVICE_IDS", None)
    else:
        env["UNIMEDVL_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in range(index * devices, (index + 1) * devices))
    return env


def command_of(argv: list[str]) -> list[str]:
    if not argv:
        raise SystemExit("launch/local.py: give the command after `--` (or trainer flags such as --config ...)")
    return TRAINER + argv if argv[0].startswith("-") else argv


def _pump(stream, prefix: str, out, log_file, lock):
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"{prefix}{line}")
            out.flush()
            if log_file is not None:
                log_file.write(line)
                log_file.flush()
    stream.close()


def launch(cmd: list[str], *, num_processes: int, devices_per_process: int, port: int = 0, platform: str = "cpu",
           init_timeout: float = 120.0, log_dir: str | None = None, grace: float = 30.0, env: dict | None = None,
           cwd: str | None = None) -> int:
    """Run `cmd` as `num_processes` processes of one JAX job; the job's exit status (see module docstring)."""
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base["PYTHONPATH"] = os.pathsep.join(p for p in (root, base.get("PYTHONPATH", "")) if p)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    procs, threads, logs, lock = [], [], [], threading.Lock()
    print(f"launch/local.py: {num_processes} process(es) × {devices_per_process} {platform} device(s), "
          f"coordinator 127.0.0.1:{port}: {' '.join(cmd)}", flush=True)
    for i in range(num_processes):
        log_file = open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir else None
        logs.append(log_file)
        p = subprocess.Popen(cmd, env=process_env(base, index=i, count=num_processes, port=port,
                                                  devices=devices_per_process, platform=platform,
                                                  init_timeout=init_timeout),
                             cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        procs.append(p)
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", out, log_file, lock), daemon=True)
            t.start()
            threads.append(t)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status, failed_at = 0, None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                rc = p.poll()
                if rc not in (None, 0) and failed_at is None:
                    status, failed_at = rc, time.time()
                    print(f"launch/local.py: process {i} exited with status {rc}; stopping the others in "
                          f"{grace:g} s", file=sys.stderr, flush=True)
            if failed_at is not None and time.time() - failed_at > grace:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                time.sleep(2)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for t in threads:
            t.join(timeout=10)
        for f in logs:
            if f is not None:
                f.close()
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        k = argv.index("--")
        argv, rest = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num_processes", type=int, default=2)
    p.add_argument("-d", "--devices_per_process", type=int, default=4)
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: simulated host devices; gpu: split this host's GPUs between the processes")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0 = a free one)")
    p.add_argument("--init_timeout", type=float, default=120.0, help="UNIMEDVL_INIT_TIMEOUT for every process")
    p.add_argument("--log_dir", default=None, help="also write each process's output to <dir>/process_<i>.log")
    p.add_argument("--grace", type=float, default=30.0, help="seconds the others get after one process fails")
    args = p.parse_args(argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        p.error("--num_processes and --devices_per_process must be >= 1")
    return launch(command_of(rest), num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                  port=args.port, platform=args.platform, init_timeout=args.init_timeout, log_dir=args.log_dir,
                  grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
