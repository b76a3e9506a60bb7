"""unimedvl_jax/entry_point.py's process set-up for spawned data workers: after spawn_without_main, a grain worker
starts without running the program's main module again, and still runs functions defined in it (cloudpickle sends
them by value)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A main module that counts its own executions (one line per run, parent or child) in a file.
MAIN = textwrap.dedent("""
    import os, sys
    with open(os.environ["RUNS_FILE"], "a") as f:
        f.write("run\\n")

    from absl import flags

    def plus_one(i):  # defined in __main__: the worker gets it by value
        return i + 1

    if __name__ == "__main__":
        flags.FLAGS.mark_as_parsed()
        if sys.argv[1] == "skip":
            from unimedvl_jax.entry_point import spawn_without_main
            spawn_without_main()
        import grain
        from data_pipelines.worker_prefetch import StreamOptions, close_stream, prefetch_in_workers
        it = prefetch_in_workers(grain.MapDataset.source(list(range(10))).map(plus_one),
                                 StreamOptions(num_workers=1, worker_buffer_size=2))
        print([next(it) for _ in range(3)])
        close_stream(it)
""")


@pytest.mark.parametrize("mode,runs", [("skip", 1), ("default", 2)])
def test_spawned_worker_runs_main_only_without_spawn_without_main(tmp_path, mode, runs):
    script, runs_file = tmp_path / "main.py", tmp_path / "runs.txt"
    script.write_text(MAIN)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), RUNS_FILE=str(runs_file))
    out = subprocess.run([sys.executable, str(script), mode], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip() == "[1, 2, 3]"
    assert runs_file.read_text().count("run") == runs  # the parent, plus the worker unless skipped
