"""Multi-process JAX from the environment: ONE `initialize()` that every entry point calls before using JAX.

Detection (first match wins; UNIMEDVL_DISTRIBUTED=auto|off|env|slurm|tpu forces one, `off` = single process):

  env     UNIMEDVL_COORDINATOR_ADDRESS=host:port, UNIMEDVL_NUM_PROCESSES=N, UNIMEDVL_PROCESS_ID=i and optionally
          UNIMEDVL_LOCAL_DEVICE_IDS=0,1,2,3 (restrict this process to those local accelerators). For anything
          that is not SLURM or a TPU VM: GKE JobSets on GPUs, bare hosts, launch/local.py.
  slurm   inside an `srun` step with more than one task (SLURM_JOB_ID, SLURM_PROCID, SLURM_STEP_NUM_TASKS or
          SLURM_NTASKS, SLURM_STEP_NODELIST or SLURM_JOB_NODELIST). Coordinator = the first host of the node list
          on UNIMEDVL_COORDINATOR_PORT (or JAX_COORDINATOR_PORT; default 61440 + job id mod 4096, as JAX's own
          SLURM detection). One process per node (all GPUs of the node visible) or per GPU (several tasks on a
          node: local device = SLURM_LOCALID, or SLURM_GPUS_PER_TASK devices from LOCALID·g, unless SLURM
          already bound the task's GPUs through CUDA_VISIBLE_DEVICES).
  tpu     a Cloud TPU VM (TPU chips on the PCI bus) or a GKE TPU pod (TPU_WORKER_HOSTNAMES): JAX's own detection
          (GCE metadata server, GKE / multi-slice MEGASCALE_* variables) finds coordinator and process ids.
  single  none of the above (or one process): nothing to initialise.

Timeout: UNIMEDVL_INIT_TIMEOUT seconds (default 300) or `initialize(timeout_s=...)`. JAX's coordination client
aborts the whole process (a C++ fatal error, no Python exception) when the other processes never arrive, and its
message does not name the coordinator. So:
  * a non-coordinator process first waits for the coordinator's TCP port; an unreachable / unresolvable address
    raises DistributedInitError naming the address, this process id and the timeout;
  * a watchdog covers the rest of the handshake: if it has not completed within the timeout, it prints the same
    kind of message to stderr and ends the process with exit status INIT_TIMEOUT_EXIT (a blocked C++ call cannot
    be interrupted from Python). JAX's own timeout is set later than the watchdog's.

Lost processes: once joined, every process runs a heartbeat thread (_Heartbeat) that publishes a counter in the
coordination service's key-value store every UNIMEDVL_HEARTBEAT_TIMEOUT/10 seconds (at most 5 s). Process 0 watches
every other process's counter, the others watch process 0's. A counter that has not moved for
UNIMEDVL_HEARTBEAT_TIMEOUT seconds (default 60), a coordinator that cannot be reached for as long, or a process that
reported a failure (leave_job) ends this process with exit status LOST_PROCESS_EXIT and one line naming the
missing process, even while the main thread is blocked in a collective that will never complete (a collective
with a dead peer hangs, or fails with a transport error: train/loop.py then waits for this verdict). JAX's own
heartbeat timeout is set later than ours: it would abort the process with a C++ fatal error instead.

Roles after initialisation: process 0 owns console logging, TensorBoard, metrics.jsonl and the checkpoint
metadata; every process writes its own array shards of each orbax checkpoint (`ocdbt.process_<i>/`) and feeds
only its addressable devices (train/loop.py).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import re
import socket
import sys
import threading
import time

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
INIT_TIMEOUT_EXIT = 3       # exit status of a process whose initialisation timed out in the watchdog
LOST_PROCESS_EXIT = 6       # exit status of a process that stopped because another process of the job was lost
DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0
_JAX_TIMEOUT_GRACE_S = 60   # JAX's own (fatal) timeouts fire this much later than our watchdogs
_HEARTBEAT_KEY = "unimedvl/heartbeat"
MODES = ("auto", "off", "env", "slurm", "tpu")


class DistributedInitError(RuntimeError):
    """The distributed system could not be initialised (bad settings, unreachable coordinator, timeout)."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the job. kind: single | env | slurm | tpu (tpu: JAX detects the rest)."""

    kind: str
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None
    detail: str = ""

    @property
    def multi_process(self) -> bool:
        return self.kind == "tpu" or self.num_processes > 1

    def describe(self) -> str:
        if self.kind == "single":
            return "single process"
        if self.kind == "tpu":
            return f"TPU ({self.detail}); coordinator and process ids from JAX's TPU detection"
        ids = "" if self.local_device_ids is None else f", local devices {list(self.local_device_ids)}"
        return (f"{self.kind}: process {self.process_id} of {self.num_processes}, coordinator "
                f"{self.coordinator_address}{ids}" + (f" ({self.detail})" if self.detail else ""))


# ----------------------------------------------------------------------------------------------------------
# detection (pure functions of an environment mapping, so tests can pass simulated environments)
# ----------------------------------------------------------------------------------------------------------
def _int(env, name: str, *, required: bool = True) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        if required:
            raise DistributedInitError(f"{name} is not set")
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedInitError(f"{name}={value!r} is not an integer") from None


def _id_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise DistributedInitError(f"{name}={text!r}: expected comma-separated integers") from None


def _check_ids(spec: ClusterSpec, source: str) -> ClusterSpec:
    if spec.num_processes < 1:
        raise DistributedInitError(f"{source}: number of processes must be >= 1, got {spec.num_processes}")
    if not 0 <= spec.process_id < spec.num_processes:
        raise DistributedInitError(f"{source}: process id {spec.process_id} not in [0, {spec.num_processes})")
    if spec.num_processes > 1:
        host, sep, port = (spec.coordinator_address or "").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedInitError(f"{source}: coordinator address {spec.coordinator_address!r} is not "
                                       f"host:port")
    return spec


def detect_env(env) -> ClusterSpec | None:
    """The UNIMEDVL_* explicit variables, or None when UNIMEDVL_COORDINATOR_ADDRESS is unset."""
    address = env.get("UNIMEDVL_COORDINATOR_ADDRESS")
    if not address:
        return None
    missing = [v for v in ("UNIMEDVL_NUM_PROCESSES", "UNIMEDVL_PROCESS_ID") if not env.get(v)]
    if missing:
        raise DistributedInitError(f"UNIMEDVL_COORDINATOR_ADDRESS={address} is set but {' and '.join(missing)} "
                                   f"{'is' if len(missing) == 1 else 'are'} not")
    ids = env.get("UNIMEDVL_LOCAL_DEVICE_IDS")
    spec = ClusterSpec("env", address, _int(env, "UNIMEDVL_NUM_PROCESSES"), _int(env, "UNIMEDVL_PROCESS_ID"),
                       _id_list(ids, "UNIMEDVL_LOCAL_DEVICE_IDS") if ids else None, "UNIMEDVL_* variables")
    return _check_ids(spec, "UNIMEDVL_* variables")


def expand_hostlist(text: str) -> list[str]:
    """SLURM hostlist expression → host names: 'gpu[001-003,007],login-[1-2]-ib' → gpu001 … login-2-ib."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):  # split at top-level commas
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    hosts = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            choices = [""]
            if ranges:
                choices = []
                for r in ranges.split(","):
                    lo, _, hi = r.partition("-")
                    if hi:
                        width = len(lo)
                        choices += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
                    else:
                        choices.append(lo)
            expanded = [e + literal + c for e in expanded for c in choices]
        hosts += expanded
    return hosts


def _tasks_on_node(env) -> int:
    """Tasks of this step on this node (SLURM_STEP_TASKS_PER_NODE like '8(x2),4', indexed by SLURM_NODEID)."""
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if text:
        counts = []
        for item in text.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
            if m:
                counts += [int(m.group(1))] * int(m.group(2) or 1)
        node = _int(env, "SLURM_NODEID", required=False) or 0
        if counts:
            return counts[node] if node < len(counts) else counts[-1]
    per_node = _int(env, "SLURM_NTASKS_PER_NODE", required=False)
    if per_node:
        return per_node
    tasks = _int(env, "SLURM_STEP_NUM_TASKS", required=False) or _int(env, "SLURM_NTASKS", required=False) or 1
    nodes = _int(env, "SLURM_STEP_NUM_NODES", required=False) or _int(env, "SLURM_JOB_NUM_NODES",
                                                                       required=False) or 1
    return max(tasks // max(nodes, 1), 1)


def detect_slurm(env) -> ClusterSpec | None:
    """The SLURM srun step this process is a task of, or None (no SLURM job, or a single task)."""
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
        return None
    in_step = "SLURM_STEP_NODELIST" in env or "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    tasks = _int(env, "SLURM_STEP_NUM_TASKS", required=False) if in_step else None
    tasks = tasks or _int(env, "SLURM_NTASKS", required=False) or 1
    if not in_step:
        if tasks > 1:
            log.warning("SLURM job %s has %d tasks but this process is not inside an srun step: running as a "
                        "single process (start the trainer with `srun`)", env["SLURM_JOB_ID"], tasks)
        return None
    if tasks <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DistributedInitError("SLURM step without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST")
    hosts = expand_hostlist(nodelist)
    port = env.get("UNIMEDVL_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT")
    if not port:
        port = str(_int(env, "SLURM_JOB_ID") % 2 ** 12 + (65535 - 2 ** 12 + 1))
    local_id = _int(env, "SLURM_LOCALID", required=False) or 0
    per_node = _tasks_on_node(env)
    local_ids = None
    if env.get("UNIMEDVL_LOCAL_DEVICE_IDS"):
        local_ids = _id_list(env["UNIMEDVL_LOCAL_DEVICE_IDS"], "UNIMEDVL_LOCAL_DEVICE_IDS")
    elif per_node > 1:  # one process per GPU (or per group of GPUs)
        per_task = _int(env, "SLURM_GPUS_PER_TASK", required=False) or 1
        visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if not visible or len(visible) > per_task:  # SLURM did not bind this task's GPUs: pick them here
            local_ids = tuple(range(local_id * per_task, (local_id + 1) * per_task))
    spec = ClusterSpec("slurm", f"{hosts[0]}:{port}", tasks, _int(env, "SLURM_PROCID"), local_ids,
                       f"job {env['SLURM_JOB_ID']}, {len(hosts)} node(s), {per_node} task(s) on this node")
    return _check_ids(spec, "SLURM environment")


def _tpu_chips() -> int:
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # noqa: BLE001 - private helper; absent → no TPU detection by PCI
        return 0


def detect_tpu(env, tpu_chips: int | None = None) -> ClusterSpec | None:
    """A multi-host TPU (GKE variables, multi-slice, or a Cloud TPU VM), or None."""
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    slices = _int(env, "MEGASCALE_NUM_SLICES", required=False) or 1
    if hosts:
        n = len([h for h in hosts.split(",") if h.strip()])
        if n * slices <= 1:
            return None
        return ClusterSpec("tpu", num_processes=n * slices, process_id=-1,
                           detail=f"{n} worker(s) per slice × {slices} slice(s) from TPU_WORKER_HOSTNAMES")
    chips = _tpu_chips() if tpu_chips is None else tpu_chips
    if chips > 0:
        return ClusterSpec("tpu", num_processes=-1, process_id=-1,
                           detail=f"Cloud TPU VM with {chips} local chip(s), {slices} slice(s)")
    return None


def detect(env=None) -> ClusterSpec:
    """The ClusterSpec of this process from `env` (default os.environ); see the module docstring."""
    env = os.environ if env is None else env
    mode = (env.get("UNIMEDVL_DISTRIBUTED") or "auto").lower()
    if mode not in MODES:
        raise DistributedInitError(f"UNIMEDVL_DISTRIBUTED={mode!r}: choose one of {MODES}")
    if mode == "off":
        return ClusterSpec("single", detail="UNIMEDVL_DISTRIBUTED=off")
    detectors = {"env": detect_env, "slurm": detect_slurm, "tpu": detect_tpu}
    for name in (detectors if mode == "auto" else (mode,)):
        spec = detectors[name](env)
        if spec is not None:
            return spec if spec.multi_process else ClusterSpec("single", detail=f"{name} with one process")
        if mode != "auto":
            raise DistributedInitError(f"UNIMEDVL_DISTRIBUTED={mode} but no {mode} environment was found")
    return ClusterSpec("single")


def _seconds_from_env(env, name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise DistributedInitError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise DistributedInitError(f"{name} must be > 0, got {value}")
    return value


def timeout_from_env(env=None) -> float:
    """UNIMEDVL_INIT_TIMEOUT (seconds; default 300)."""
    return _seconds_from_env(os.environ if env is None else env, "UNIMEDVL_INIT_TIMEOUT", DEFAULT_TIMEOUT_S)


def heartbeat_timeout_from_env(env=None) -> float:
    """UNIMEDVL_HEARTBEAT_TIMEOUT (seconds; default 60): how long a silent process counts as alive."""
    return _seconds_from_env(os.environ if env is None else env, "UNIMEDVL_HEARTBEAT_TIMEOUT",
                             DEFAULT_HEARTBEAT_TIMEOUT_S)


# ----------------------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------------------
def wait_for_coordinator(address: str, deadline: float, *, what: str) -> None:
    """Poll until `address` (host:port) accepts a TCP connection; DistributedInitError at `deadline`."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    last = None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, max(deadline - time.time(), 0.1))):
                return
        except OSError as e:
            last = e
        if time.time() >= deadline:
            raise DistributedInitError(f"{what}: the coordinator {address} was not reachable ({last}). Check "
                                       f"that process 0 runs on that host and that the port is open to this host.")
        time.sleep(0.2)


class _Watchdog:
    """Ends the process with a clear message if the handshake has not finished by the deadline."""

    def __init__(self, seconds: float, message: str):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(seconds, message), daemon=True,
                                        name="unimedvl-distributed-init-watchdog")
        self._thread.start()

    def _run(self, seconds, message):
        if not self._done.wait(seconds):
            sys.stdout.flush()
            sys.stderr.write(f"unimedvl: error: {message}\n")
            sys.stderr.flush()
            os._exit(INIT_TIMEOUT_EXIT)

    def cancel(self):
        self._done.set()


class _Heartbeat:
    """Publishes this process's heartbeat and watches its peers' (see module docstring); a lost peer ends this
    process with LOST_PROCESS_EXIT and one line naming it."""

    def __init__(self, client, process_id: int, num_processes: int, timeout: float, coordinator: str | None):
        self.client, self.me, self.n, self.timeout = client, process_id, num_processes, timeout
        self.coordinator = coordinator or "the coordinator"
        self.interval = min(max(timeout / 10, 0.2), 5.0)
        self._stop = threading.Event()
        self._failed = False                 # reported a failure: the marker replaces the counter
        self._thread = threading.Thread(target=self._run, daemon=True, name="unimedvl-heartbeat")
        self._thread.start()

    def _watched(self) -> list[int]:
        return [j for j in range(self.n) if j != self.me] if self.me == 0 else [0]

    def _read(self, j: int) -> str | None:
        try:
            return self.client.key_value_try_get(f"{_HEARTBEAT_KEY}/{j}")
        except Exception:  # noqa: BLE001 - NOT_FOUND before the peer's first beat
            return None

    def _run(self) -> None:
        beat, last_contact = 0, time.time()
        seen = {j: (None, time.time()) for j in self._watched()}
        while not self._stop.wait(self.interval):
            beat += 1
            now = time.time()
            try:
                if not self._failed:
                    self.client.key_value_set(f"{_HEARTBEAT_KEY}/{self.me}", str(beat), allow_overwrite=True)
                values = {j: self._read(j) for j in seen}
                last_contact = now
            except Exception as e:  # noqa: BLE001 - the coordinator is gone (or unreachable)
                if now - last_contact > self.timeout:
                    first = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
                    self._lost(f"lost contact with the coordinator (process 0 at {self.coordinator}) for "
                               f"{now - last_contact:.0f} s ({first.strip()[:200]})")
                continue
            for j, value in values.items():
                if value is not None and value.startswith("failed:"):
                    self._lost(f"process {j} of {self.n} failed:{value[len('failed:'):]}")
                if value != seen[j][0]:
                    seen[j] = (value, now)
            stale = [j for j, (_, since) in seen.items() if now - since > self.timeout]
            if stale:
                who = ", ".join(str(j) for j in stale)
                self._lost(f"process {who} of {self.n} stopped sending heartbeats (none for "
                           f"{now - min(seen[j][1] for j in stale):.0f} s): killed, crashed or its host is gone")

    def _lost(self, why: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"unimedvl: error: {why}; process {self.me} stops too (UNIMEDVL_HEARTBEAT_TIMEOUT="
                         f"{self.timeout:g} s). Rerun the job: it resumes from the last checkpoint.\n")
        sys.stderr.flush()
        os._exit(LOST_PROCESS_EXIT)

    def report_failure(self, message: str) -> None:
        """Tell the peers this process is failing (they stop at once, naming it); keep watching them."""
        self._failed = True
        try:
            self.client.key_value_set(f"{_HEARTBEAT_KEY}/{self.me}", "failed: " + message, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator is gone: the peers find out by the timeout
            pass


_INITIALIZED: ClusterSpec | None = None
_HEARTBEAT: _Heartbeat | None = None


def initialize(*, timeout_s: float | None = None, env=None) -> ClusterSpec:
    """Join the distributed JAX job described by the environment (no-op for single-process runs).

    Call once, before any JAX computation or device query. Returns the ClusterSpec used (for a TPU job the
    process id and count are JAX's after initialisation). Raises DistributedInitError on inconsistent settings or
    an unreachable coordinator; a handshake that does not complete within the timeout ends the process with
    status INIT_TIMEOUT_EXIT and a message naming the coordinator, process id and timeout."""
    global _INITIALIZED, _HEARTBEAT
    if _INITIALIZED is not None:
        return _INITIALIZED
    env = os.environ if env is None else env
    spec = detect(env)
    if spec.kind == "single" or jax.distributed.is_initialized():
        _INITIALIZED = spec
        return spec
    timeout = float(timeout_s) if timeout_s is not None else timeout_from_env(env)
    heartbeat_timeout = heartbeat_timeout_from_env(env)
    deadline = time.time() + timeout
    jax_timeout = int(timeout) + _JAX_TIMEOUT_GRACE_S
    jax_heartbeat = int(heartbeat_timeout) + _JAX_TIMEOUT_GRACE_S
    if spec.kind == "tpu":
        what = f"TPU process ({spec.detail})"
        watchdog = _Watchdog(timeout, f"{what}: JAX distributed initialisation did not complete within "
                                      f"{timeout:g} s (UNIMEDVL_INIT_TIMEOUT); did every TPU worker start the "
                                      f"trainer (`--worker=all`)?")
        try:
            jax.distributed.initialize(initialization_timeout=jax_timeout, heartbeat_timeout_seconds=jax_heartbeat)
        finally:
            watchdog.cancel()
        spec = dataclasses.replace(spec, num_processes=jax.process_count(), process_id=jax.process_index(),
                                   coordinator_address=getattr(_global_state(), "coordinator_address", None))
    else:
        who = f"process {spec.process_id} of {spec.num_processes}"
        if spec.process_id != 0:
            wait_for_coordinator(spec.coordinator_address, deadline,
                                 what=f"{who} ({spec.kind}), timeout {timeout:g} s")
        remaining = max(deadline - time.time(), 0.5)
        if spec.process_id == 0:
            why = (f"not all {spec.num_processes} processes connected to the coordinator {spec.coordinator_address} "
                   f"started by this process within {timeout:g} s (UNIMEDVL_INIT_TIMEOUT). Was every process "
                   f"started, with the same coordinator address and process count and a distinct process id?")
        else:
            why = (f"reached the coordinator {spec.coordinator_address} but the handshake with all "
                   f"{spec.num_processes} processes did not complete within {timeout:g} s (UNIMEDVL_INIT_TIMEOUT). "
                   f"Was every process started, with the same coordinator address and process count?")
        watchdog = _Watchdog(remaining, f"{who} ({spec.kind}): {why}")
        try:
            jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id,
                                       list(spec.local_device_ids) if spec.local_device_ids is not None else None,
                                       cluster_detection_method="deactivate", initialization_timeout=jax_timeout,
                                       heartbeat_timeout_seconds=jax_heartbeat)
        finally:
            watchdog.cancel()
    log.info("JAX distributed: %s", spec.describe())
    _HEARTBEAT = _Heartbeat(_global_state().client, jax.process_index(), jax.process_count(), heartbeat_timeout,
                            spec.coordinator_address)
    _INITIALIZED = spec
    return spec


def await_lost_peer() -> None:
    """Give the heartbeat watcher the time to find a lost process (it then ends this process, naming it): for an
    error of a collective, which is what a dead peer looks like from here. A no-op with one process."""
    if _HEARTBEAT is not None:
        time.sleep(_HEARTBEAT.timeout + 2 * _HEARTBEAT.interval + 1)


def leave_job(message: str, exit_status: int) -> None:
    """This process is failing with `message`: tell the other processes (they stop at once, naming it) and make
    the exit skip JAX's shutdown barrier (which would wait for the peers, stuck in a collective or gone, and
    then abort) by ending with `exit_status` right after the other exit handlers. A no-op with one process."""
    if _HEARTBEAT is None:
        return
    _HEARTBEAT.report_failure(" ".join(message.split())[:500])

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_status)

    atexit.register(leave)  # atexit runs last-registered first: before JAX's distributed shutdown


def _global_state():
    try:
        from jax._src import distributed as _d

        return _d.global_state
    except Exception:  # noqa: BLE001
        return None


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def initialize_or_exit(prog: str, *, timeout_s: float | None = None) -> ClusterSpec:
    """initialize() for command-line entry points: a failed join prints `prog: error: ...` and exits with 3."""
    try:
        return initialize(timeout_s=timeout_s)
    except DistributedInitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(INIT_TIMEOUT_EXIT)
