#!/usr/bin/env python3
"""Train UniMedVL on a Cloud TPU pod slice (or several slices) with gcloud.

    python launch/tpu_pod.py --name unimedvl-v5p32 --zone us-east5-a --accelerator v5p-32 \\
        --repo https://github.com/you/unimedvl_jax.git --workdir /mnt/shared/runs/v5p32 --dry-run \\
        -- --config configs/unimedvl_14b.py --config.mesh.shape="(1,-1,1)" --config.mesh.rules=fsdp

Steps (each printed exactly, one command per line, with --dry-run; run in order otherwise):
  1. TPU: reuse the TPU VM `--name` if `describe` finds it, else create it (`tpu-vm create`). With --queued (or
     --num-slices > 1, which needs it) a queued resource `<name>-qr` is created instead (`--node-id <name>`, or
     `--node-count N --node-prefix <name>` for N slices) and polled until ACTIVE.
  2. code on every worker: `git clone` / `git fetch` + checkout of --ref (--repo), or a `git archive` of the local
     HEAD copied with `tpu-vm scp --worker=all` and unpacked (--code copy).
  3. install on every worker: a venv with the package and jax[tpu] (--install-cmd to change).
  4. --setup commands on every worker (e.g. mount the shared filesystem that holds --workdir and the data).
  5. the trainer on ALL workers at once (`tpu-vm ssh --worker=all`, or `queued-resources ssh --node=all
     --worker=all` for multi-slice): `unimedvl-train <trainer args> --workdir <workdir>`. JAX finds the other
     workers by itself (unimedvl_jax/distributed.py, TPU detection); the output of all workers streams here.
     With --detach the trainer runs under nohup (log ~/unimedvl-train.log on every worker) and only worker 0's
     log is followed (Ctrl-C stops following, not training).
  6. --after keep (default) | stop | delete the TPU VM / queued resource.

Multi-slice (--num-slices N > 1): the slices talk over DCN; the trainer gets --config.mesh.dcn_shape=(N,1,1)
(data parallel across slices, fsdp/tensor inside each) unless the trainer arguments set it. mesh.shape's data
axis must then be a multiple of N, e.g. --config.mesh.shape="(2,-1,1)" for 2 slices.

Preemption: a preempted (spot) slice's trainer gets SIGTERM, saves a checkpoint in --workdir and exits 0. Rerun
the same command: the TPU is recreated (or reused), the code refreshed, and the trainer resumes from the latest
checkpoint. --workdir (and the dataset directory) must be a filesystem every worker sees (NFS / Filestore /
gcsfuse mount, see --setup): every worker writes its own checkpoint shards.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time

RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "~/unimedvl_jax"
REMOTE_VENV = "~/unimedvl-venv"
REMOTE_LOG = "~/unimedvl-train.log"
DEFAULT_INSTALL = (f"python3 -m venv {REMOTE_VENV} && {REMOTE_VENV}/bin/pip install --quiet --upgrade pip && "
                   f"{REMOTE_VENV}/bin/pip install --quiet -e {REMOTE_DIR} 'jax[tpu]>=0.10,<0.11'")


@dataclasses.dataclass
class Step:
    """One command. `probe`: its failure is not an error, it only decides whether the next `when_failed` step
    runs (describe → create); `until`: repeat every `poll_s` until stdout (stripped) equals it."""

    argv: list[str]
    comment: str = ""
    probe: bool = False
    when_failed: bool = False
    until: str | None = None
    poll_s: float = 30.0
    local: bool = False       # runs on this machine (not gcloud)


def runtime_version(accelerator: str) -> str:
    family = accelerator.rsplit("-", 1)[0]
    if family not in RUNTIME_VERSIONS:
        raise SystemExit(f"tpu_pod.py: no default runtime version for {accelerator!r}; pass --runtime-version")
    return RUNTIME_VERSIONS[family]


def plan(args) -> list[Step]:
    """Every command of a launch, in order."""
    loc = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    queued = args.queued or args.num_slices > 1
    qr = args.queued_resource or f"{args.name}-qr"
    version = args.runtime_version or runtime_version(args.accelerator)
    steps: list[Step] = []

    # 1. TPU
    if queued:
        create = ["gcloud", "compute", "tpus", "queued-resources", "create", qr, *loc,
                  f"--accelerator-type={args.accelerator}", f"--runtime-version={version}"]
        create += ([f"--node-count={args.num_slices}", f"--node-prefix={args.name}"] if args.num_slices > 1
                   else [f"--node-id={args.name}"])
        create += ["--spot"] if args.spot else []
        steps += [Step(["gcloud", "compute", "tpus", "queued-resources", "describe", qr, *loc,
                        "--format=value(state.state)"], f"1. TPU: reuse queued resource {qr} if it exists",
                       probe=True),
                  Step(create, f"   ... else create it ({args.num_slices} × {args.accelerator})", when_failed=True),
                  Step(["gcloud", "compute", "tpus", "queued-resources", "describe", qr, *loc,
                        "--format=value(state.state)"], "   wait until it is ACTIVE (polled every 30 s)",
                       until="ACTIVE")]
    else:
        create = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *loc,
                  f"--accelerator-type={args.accelerator}", f"--version={version}"]
        create += ["--spot"] if args.spot else []
        steps += [Step(["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *loc,
                        "--format=value(state)"], f"1. TPU: reuse TPU VM {args.name} if it exists", probe=True),
                  Step(create, f"   ... else create it ({args.accelerator})", when_failed=True)]

    def on_all(command: str, comment: str) -> Step:
        if args.num_slices > 1:
            argv = ["gcloud", "compute", "tpus", "queued-resources", "ssh", qr, *loc, "--node=all", "--worker=all",
                    f"--command={command}"]
        else:
            argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *loc, "--worker=all",
                    f"--command={command}"]
        return Step(argv, comment)

    # 2. code
    if args.code == "git":
        ref = shlex.quote(args.ref)
        steps.append(on_all(f"test -d {REMOTE_DIR}/.git || git clone --quiet {shlex.quote(args.repo)} {REMOTE_DIR}"
                            f" && git -C {REMOTE_DIR} fetch --quiet origin {ref}"
                            f" && git -C {REMOTE_DIR} checkout --quiet --force FETCH_HEAD",
                            f"2. code: {args.repo} at {args.ref} on every worker"))
    else:
        tarball = args.archive
        steps.append(Step(["git", "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
                          "2. code: this checkout's HEAD (committed files) ...", local=True))
        if args.num_slices > 1:
            scp = ["gcloud", "compute", "tpus", "queued-resources", "scp", tarball, f"{qr}:~/unimedvl_jax.tar.gz",
                   *loc, "--node=all", "--worker=all"]
        else:
            scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:~/unimedvl_jax.tar.gz",
                   *loc, "--worker=all"]
        steps.append(Step(scp, "   ... copied to every worker"))
        steps.append(on_all(f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
                            f"tar -xzf ~/unimedvl_jax.tar.gz -C {REMOTE_DIR}", "   ... and unpacked"))

    # 3. install, 4. setup
    if not args.skip_install:
        steps.append(on_all(args.install_cmd, "3. install on every worker"))
    for command in args.setup:
        steps.append(on_all(command, "4. setup on every worker"))

    # 5. train
    trainer = list(args.trainer_args)
    if args.num_slices > 1 and not any(a.startswith("--config.mesh.dcn_shape") for a in trainer):
        trainer.append(f"--config.mesh.dcn_shape=({args.num_slices},1,1)")
    env = [f"UNIMEDVL_INIT_TIMEOUT={int(args.init_timeout)}"]
    env += [f"{k}={shlex.quote(v)}" for k, v in (kv.split("=", 1) for kv in args.env)]
    train = " ".join([f"cd {REMOTE_DIR} &&", *env, f"{REMOTE_VENV}/bin/unimedvl-train",
                      *(shlex.quote(a) for a in trainer), f"--workdir={shlex.quote(args.workdir)}"])
    if args.detach:
        steps.append(on_all(f"nohup bash -c {shlex.quote(train)} > {REMOTE_LOG} 2>&1 &",
                            "5. train on all workers, detached (log ~/unimedvl-train.log on each)"))
        follow = on_all(f"tail -n +1 -F {REMOTE_LOG}", "   follow worker 0's log (Ctrl-C stops following only)")
        follow.argv = [a for a in follow.argv if a not in ("--worker=all", "--node=all")] + ["--worker=0"]
        steps.append(follow)
    else:
        steps.append(on_all(train, f"5. train on all workers of {args.num_slices} × {args.accelerator}; "
                                   f"their output streams here"))

    # 6. after
    if args.after == "stop":
        steps.append(Step(["gcloud", "compute", "tpus", "tpu-vm", "stop", args.name, *loc], "6. stop the TPU VM"))
    elif args.after == "delete":
        if queued:
            steps.append(Step(["gcloud", "compute", "tpus", "queued-resources", "delete", qr, *loc, "--force",
                               "--quiet"], "6. delete the queued resource (and its TPU VMs)"))
        else:
            steps.append(Step(["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *loc, "--quiet"],
                              "6. delete the TPU VM"))
    return steps


def format_plan(steps: list[Step]) -> str:
    """The --dry-run text: `# comment` lines, then each command exactly as it would run (shell-quoted)."""
    lines = []
    for s in steps:
        if s.comment:
            lines.append(f"# {s.comment}")
        lines.append(shlex.join(s.argv))
    return "\n".join(lines)


def execute(steps: list[Step], *, wait_timeout_s: float) -> int:
    previous_failed = False
    for s in steps:
        if s.when_failed and not previous_failed:
            print(f"# (exists, not created) {shlex.join(s.argv)}", flush=True)
            continue
        print(f"# {s.comment}\n{shlex.join(s.argv)}" if s.comment else shlex.join(s.argv), flush=True)
        if s.until is not None:
            end = time.time() + wait_timeout_s
            while True:
                out = subprocess.run(s.argv, capture_output=True, text=True)
                state = out.stdout.strip()
                if state == s.until:
                    break
                if time.time() > end:
                    print(f"tpu_pod.py: still {state or out.stderr.strip()!r} after {wait_timeout_s:g} s",
                          file=sys.stderr)
                    return 1
                time.sleep(s.poll_s)
            previous_failed = False
            continue
        rc = subprocess.run(s.argv).returncode
        if s.probe:  # a failed describe means: create it next
            previous_failed = rc != 0
            continue
        if rc != 0:
            print(f"tpu_pod.py: command failed with status {rc}", file=sys.stderr)
            return rc
        previous_failed = False
    return 0


def parse_args(argv):
    argv = list(argv)
    trainer = []
    if "--" in argv:
        k = argv.index("--")
        argv, trainer = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--name", required=True, help="TPU VM name (node prefix for multi-slice)")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator", required=True, help="e.g. v5p-32, v5litepod-64, v4-32, v6e-64")
    p.add_argument("--runtime-version", default=None, help="TPU software version (default per TPU family)")
    p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    p.add_argument("--queued", action="store_true", help="create through a queued resource")
    p.add_argument("--queued-resource", default=None, help="queued resource id (default <name>-qr)")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: number of slices (queued resource)")
    p.add_argument("--code", choices=("git", "copy"), default="git")
    p.add_argument("--repo", default=None, help="git URL the workers clone (--code git)")
    p.add_argument("--ref", default="main", help="branch / tag / commit to check out (--code git)")
    p.add_argument("--archive", default="/tmp/unimedvl_jax.tar.gz", help="local tarball path (--code copy)")
    p.add_argument("--install-cmd", default=DEFAULT_INSTALL)
    p.add_argument("--skip-install", action="store_true")
    p.add_argument("--setup", action="append", default=[], help="shell command run on every worker before "
                   "training (repeatable), e.g. mounting the shared filesystem of --workdir")
    p.add_argument("--workdir", required=True, help="run directory on a filesystem every worker sees")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the trainer (repeatable)")
    p.add_argument("--init-timeout", type=float, default=600, help="UNIMEDVL_INIT_TIMEOUT on the workers")
    p.add_argument("--detach", action="store_true", help="run under nohup and follow worker 0's log")
    p.add_argument("--after", choices=("keep", "stop", "delete"), default="keep")
    p.add_argument("--wait-timeout", type=float, default=3600, help="seconds to wait for a queued resource")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    args = p.parse_args(argv)
    if args.num_slices < 1:
        p.error("--num-slices must be >= 1")
    if args.code == "git" and not args.repo:
        p.error("--code git needs --repo URL (or use --code copy)")
    if args.after == "stop" and (args.queued or args.num_slices > 1):
        p.error("--after stop is for TPU VMs; a queued resource can only be deleted")
    for kv in args.env:
        if "=" not in kv:
            p.error(f"--env {kv!r}: expected KEY=VALUE")
    args.trainer_args = trainer or ["--config=configs/unimedvl_14b.py"]
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    steps = plan(args)
    if args.dry_run:
        print(format_plan(steps))
        return 0
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # git archive of this checkout
    return execute(steps, wait_timeout_s=args.wait_timeout)


if __name__ == "__main__":
    sys.exit(main())
