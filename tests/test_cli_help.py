"""Every console script of pyproject.toml answers --help with exit status 0: its usage text, each of its own absl
flags with its description and, for commands reading a --config file, the `--config.section.key=value` override
syntax with an example, and --debug (every command). The expected flags come from the flags the command's module
defines (absl's flags_by_module_dict on a fresh registry), not from the help renderer. Also: a bad command line is
one `prog: error: ...` line and exit status 2 (tests/test_cli_errors.py: bad input)."""

import concurrent.futures
import importlib
import inspect
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from absl import flags

from data_pipelines import build
from unimedvl_jax import entry_point, train_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BIN = pathlib.Path(sys.executable).parent
EXTRA_RUNS = [("unimedvl-build-data", "--helpfull")]


def _squash(text: str) -> str:
    return " ".join(text.split())


def command_of(script: str) -> entry_point.Command:
    """The entry_point.Command named `script` in the module of its console-script target."""
    module = importlib.import_module(SCRIPTS[script].partition(":")[0])
    found = [v for v in vars(module).values() if isinstance(v, entry_point.Command) and v.prog == script]
    assert len(found) == 1, f"{module.__name__}: {len(found)} Commands named {script}"
    return found[0]


def expected_flags(script: str) -> list[flags.Flag]:
    """The flags the command's module defines on a fresh registry (+ its --config file flag)."""
    command = command_of(script)
    fv = flags.FlagValues()
    command.define(fv)
    by_module = fv.flags_by_module_dict()
    module = SCRIPTS[script].partition(":")[0]
    own = list(by_module.get(module, []))
    assert sum(len(v) for v in by_module.values()) == len(own), f"{script}: flags from {sorted(by_module)}"
    if command.config is not None:
        own.append(command.own_flags()[0])  # the --config file flag (defined by entry_point)
        assert own[-1].name == "config"
    assert own, f"{script} defines no flag"
    return own


@pytest.fixture(scope="module")
def outputs():
    """{(script, flag): CompletedProcess} of every `<script> --help` (+ EXTRA_RUNS), run in parallel."""
    runs = [(script, "--help") for script in SCRIPTS] + EXTRA_RUNS
    for script, _ in runs:
        assert (BIN / script).exists(), f"{BIN / script} missing: pip install -e ."
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def call(run):
        script, flag = run
        return subprocess.run([str(BIN / script), flag], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=300)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(runs, pool.map(call, runs)))


def test_every_script_has_a_command():
    assert len(SCRIPTS) >= 10
    for script in SCRIPTS:
        command_of(script)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_lists_the_commands_own_flags(script, outputs):
    proc = outputs[(script, "--help")]
    assert proc.returncode == 0, f"{script} --help: rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    out, command = _squash(proc.stdout), command_of(script)
    assert _squash(inspect.cleandoc(command.doc)) in out                    # the usage examples
    assert f"{script} --" in out
    for flag in expected_flags(script):
        name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
        assert f"{name}: {_squash(flag.help)}" in out, f"{script} --help lacks {name} with its description"
    assert "--[no]debug: show the Python traceback" in out
    if command.config is not None:
        assert "--config.section.key=value" in out and _squash(command.config.example) in out
    else:
        assert "--config.section.key=value" not in out


def test_helpfull_adds_the_library_flags(outputs):
    proc = outputs[("unimedvl-build-data", "--helpfull")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--data-dir: TFDS data directory" in proc.stdout and "Library flags:" in proc.stdout
    assert "--flagfile" in proc.stdout


def test_bad_command_lines_exit_2(capsys, tmp_path):
    cases = [(build.main, ["--dataset", "nope", "--data-dir", str(tmp_path)], "value should be one of"),
             (build.main, ["--dataset", "manifest", "--data-dir", str(tmp_path)], "needs --manifest"),
             (build.main, ["--data-dir", str(tmp_path)], "--dataset must have a value"),
             (build.main, ["--dataset", "unimed-mini", "--data-dir", str(tmp_path), "extra"], "unexpected arguments"),
             (train_cli.main, [f"--config={ROOT / 'configs/tiny.py'}", f"--workdir={tmp_path}",
                               "--config.train.nope=1"], "override names no field"),
             (train_cli.main, ["--config=missing.py", f"--workdir={tmp_path}"], "--config missing.py: no such file")]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == entry_point.USAGE_EXIT, argv
        err = capsys.readouterr().err
        assert message in err and "--help" in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("unimedvl-"), err  # one `prog: error:` line
    assert not any(tmp_path.iterdir())
