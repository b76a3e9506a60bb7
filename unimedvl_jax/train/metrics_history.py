"""Keep the metrics history equal to the history of the state being trained.

A (re)start continues from step N (a restored checkpoint, or 0). Rows an earlier run logged for steps after N
describe updates the restored state never went through (the steps after the last checkpoint of a killed run,
or everything after a damaged checkpoint that was skipped); the new run logs those steps again. So on every
start, before logging resumes:

* every `kind: step` / `kind: summary` row with step > N moves from metrics.jsonl (and a process's
  metrics.process<k>.jsonl) to metrics.abandoned.jsonl (metrics.process<k>.abandoned.jsonl), each marked
  `"abandoned_at_restore": N`; a line torn by a kill is moved there too, as `{"kind": "torn", "text": ...}`.
  metrics.jsonl then holds exactly one row per step of the timeline that leads to the current state.
* TensorBoard gets a purge marker at step N + 1 (a SessionLog.START event in a file of its own), so it hides the
  abandoned summaries of steps > N, as tensorboardX's `purge_step` does.
"""

from __future__ import annotations

import json
import os


def abandoned_path(path: str) -> str:
    """metrics.jsonl → metrics.abandoned.jsonl (metrics.process1.jsonl → metrics.process1.abandoned.jsonl)."""
    root, ext = os.path.splitext(path)
    return f"{root}.abandoned{ext}"


def rewind_jsonl(path: str, step: int) -> tuple[int, int]:
    """Move the rows of steps > `step` (and torn lines) of the JSONL file `path` to its abandoned file; (step rows,
    summary rows) moved."""
    if not os.path.exists(path):
        return 0, 0
    keep, moved, counts = [], [], {"step": 0, "summary": 0}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                moved.append({"kind": "torn", "text": line.rstrip("\n"), "abandoned_at_restore": step})
                continue
            if row.get("kind") in counts and int(row.get("step", 0)) > step:
                counts[row["kind"]] += 1
                moved.append({**row, "abandoned_at_restore": step})
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return 0, 0
    with open(abandoned_path(path), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in moved)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return counts["step"], counts["summary"]


def purge_tensorboard(tb_dir: str, step: int) -> None:
    """Write a TensorBoard purge marker: events of steps >= `step` written before it are hidden."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.writer import FileWriter

    writer = FileWriter(tb_dir, filename_suffix=".purge")
    writer.add_event(Event(step=step, file_version="brain.Event:2"))
    writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
    writer.close()


def rewind(workdir: str, step: int, process_index: int) -> str | None:
    """Rewind this process's metrics files of `workdir` to `step` (see module docstring); a one-line note of
    what moved, or None."""
    name = "metrics.jsonl" if process_index == 0 else f"metrics.process{process_index}.jsonl"
    path = os.path.join(workdir, name)
    steps, summaries = rewind_jsonl(path, step)
    if process_index == 0 and summaries and os.path.isdir(os.path.join(workdir, "tb")):
        purge_tensorboard(os.path.join(workdir, "tb"), step + 1)
    if not (steps or summaries):
        return None
    return (f"metrics: {steps} step row(s) and {summaries} summary row(s) of steps after {step} from an earlier run "
            f"moved to {abandoned_path(path)}")
