"""Every command turns bad input into ONE stderr line `prog: error: <message naming the file>` and exit status 2,
without a traceback: a missing file or directory, a truncated safetensors file, invalid JSON (each where the
command reads one). `--debug` shows the traceback instead; a bug (any other exception) always shows it. The
commands are called in-process through their main(argv) and fail before any model is built or compiled; two
subprocess runs check what a console script really prints."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from PIL import Image

from data_pipelines import build, tfds_builder
from unimedvl_jax import cli, demo, entry_point, eval_cli, inference_cli, train_cli, train_vae_cli
from unimedvl_jax.errors import UserError, describe, is_user_error, read_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
BIN = pathlib.Path(sys.executable).parent
INVALID_JSON = '{"hidden_size": 64,\n "num_hidden_layers": '


@pytest.fixture(scope="module")
def files(tmp_path_factory, official_dir):
    """Bad inputs: copies of the official tiny checkpoint with a truncated ema.safetensors and with an invalid
    llm_config.json, a params checkpoint whose config.json is invalid, an invalid tokenizer config, a data dir
    that looks built, a demo workdir whose VAE config.json is invalid, a PNG and a manifest."""
    base = tmp_path_factory.mktemp("bad_input")
    truncated = pathlib.Path(shutil.copytree(official_dir / "tiny_ckpt", base / "truncated"))
    data = (truncated / "ema.safetensors").read_bytes()
    (truncated / "ema.safetensors").write_bytes(data[:len(data) // 2])
    bad_json = pathlib.Path(shutil.copytree(official_dir / "tiny_ckpt", base / "bad_json"))
    (bad_json / "llm_config.json").write_text(INVALID_JSON)
    params = base / "params_ckpt"
    (params / "params").mkdir(parents=True)
    (params / "config.json").write_text(INVALID_JSON)
    (base / "tok").mkdir()
    (base / "tok" / "spm_tokenizer.json").write_text(INVALID_JSON)
    tfds_builder.dataset_dir(base / "data", tfds_builder.UNIMED_MINI).mkdir(parents=True)
    (base / "demo" / "vae").mkdir(parents=True)
    (base / "demo" / "vae" / "config.json").write_text(INVALID_JSON)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(base / "scan.png")
    (base / "manifest.jsonl").write_text("{}\n")
    return base


def _cases(f: pathlib.Path):
    """(id, main, argv, text the error line must hold)."""
    missing, out = f / "missing", f / "out"
    png = str(f / "scan.png")
    vqa = ["--image", png, "--question", "Which modality?"]
    gen = ["--prompt", "a CT slice", "--out", str(out / "g.png")]
    edit = ["--image", png, "--instruction", "sharpen", "--out", str(out / "e.png")]
    evl = ["--benchmark", "manifest", "--data", str(f / "manifest.jsonl"), "--out", str(out / "eval")]
    train = [f"--config={TINY}", f"--config.data.data_dir={f / 'data'}"]
    not_built = [f"--config={TINY}", f"--config.data.data_dir={missing}", "--config.data.dataset=manifest_x"]
    truncated = "ema.safetensors: truncated or corrupt (the header says 1433232 bytes, the file has 716616)"
    official_json = "bad_json/llm_config.json: not a valid JSON file: Expecting value at line 2 column 23"
    params_json = "params_ckpt/config.json: not a valid model config (JSON)"
    return [
        ("import-missing", cli.import_main, ["--official", str(missing), "--out", str(out / "i")],
         "missing/llm_config.json: missing"),
        ("import-truncated", cli.import_main, ["--official", str(f / "truncated"), "--out", str(out / "i")],
         truncated),
        ("import-json", cli.import_main, ["--official", str(f / "bad_json"), "--out", str(out / "i")],
         official_json),
        ("export-missing", cli.export_main, ["--checkpoint", str(missing), "--out", str(out / "x")],
         "missing/config.json: missing"),
        ("export-json", cli.export_main, ["--checkpoint", str(f / "params_ckpt"), "--out", str(out / "x")],
         params_json),
        ("build-data-missing", build.main, ["--dataset", "manifest", "--manifest", str(missing / "m.jsonl"),
                                            "--data-dir", str(out / "d")], "missing/m.jsonl: No such file"),
        ("train-missing-config", train_cli.main, [f"--config={missing}.py", f"--workdir={out / 't'}"],
         f"--config {missing}.py: no such file"),
        ("train-not-built", train_cli.main, [*not_built, f"--workdir={out / 't'}"],
         "manifest_x/1.2.0: dataset 'manifest_x' is not built"),
        ("train-json", train_cli.main, [*train, f"--config.data.tokenizer={f / 'tok' / 'spm_tokenizer.json'}",
                                        f"--workdir={out / 't2'}"], "tok/spm_tokenizer.json: not a valid"),
        ("train-bad-stream", train_cli.main, [*train, "--config.data.num_workers=-1", "--config.data.read_threads=0",
                                              f"--workdir={out / 't3'}"],
         "invalid data config: data.num_workers=-1 must be an integer >= 0; data.read_threads=0 must be an integer"),
        ("train-vae-not-built", train_vae_cli.main, [*not_built, f"--out={out / 'v'}"], "is not built"),
        ("vqa-missing-checkpoint", inference_cli.vqa_main, ["--checkpoint", str(missing), *vqa],
         "missing: no such directory"),
        ("vqa-missing-image", inference_cli.vqa_main, ["--checkpoint", str(f / "truncated"), "--image",
                                                       str(missing / "x.png"), "--question", "q"],
         "--image " + str(missing / "x.png") + ": no such file"),
        ("vqa-truncated", inference_cli.vqa_main, ["--checkpoint", str(f / "truncated"), *vqa], truncated),
        ("vqa-json", inference_cli.vqa_main, ["--checkpoint", str(f / "bad_json"), *vqa], official_json),
        ("generate-missing", inference_cli.generate_main, ["--checkpoint", str(missing), *gen],
         "missing: no such directory"),
        ("generate-truncated", inference_cli.generate_main, ["--checkpoint", str(f / "truncated"), *gen], truncated),
        ("generate-json", inference_cli.generate_main, ["--checkpoint", str(f / "params_ckpt"), *gen], params_json),
        ("edit-missing", inference_cli.edit_main, ["--checkpoint", str(missing), *edit],
         "missing: no such directory"),
        ("edit-truncated", inference_cli.edit_main, ["--checkpoint", str(f / "truncated"), *edit], truncated),
        ("edit-json", inference_cli.edit_main, ["--checkpoint", str(f / "bad_json"), *edit], official_json),
        ("eval-missing-data", eval_cli.main, ["--benchmark", "manifest", "--data", str(missing), "--checkpoint",
                                              str(f / "truncated"), "--out", str(out / "eval")],
         "--data " + str(missing) + ": no such file or directory"),
        ("eval-missing-checkpoint", eval_cli.main, [*evl, "--checkpoint", str(missing)],
         "missing: no such directory"),
        ("eval-truncated", eval_cli.main, [*evl, "--checkpoint", str(f / "truncated")], truncated),
        ("eval-json", eval_cli.main, [*evl, "--checkpoint", str(f / "params_ckpt")], params_json),
        ("eval-vqa-missing", cli.eval_vqa_main, ["--checkpoint", str(missing), "--tokenizer", str(f / "tok")],
         "missing/config.json: missing"),
        ("eval-vqa-json", cli.eval_vqa_main, ["--checkpoint", str(f / "params_ckpt"), "--tokenizer",
                                              str(f / "tok")], params_json),
        ("demo-missing-config", demo.main, [f"--config={missing}.py", f"--workdir={out / 'demo'}"],
         f"--config {missing}.py: no such file"),
        ("demo-json", demo.main, [f"--config.data.data_dir={f / 'data'}", f"--workdir={f / 'demo'}"],
         "demo/vae/config.json: not a valid VAE checkpoint config (JSON)"),
    ]


CASE_IDS = [case[0] for case in _cases(pathlib.Path("/x"))]
PROGS = {cli.import_main: "unimedvl-import", cli.export_main: "unimedvl-export", build.main: "unimedvl-build-data",
         train_cli.main: "unimedvl-train", train_vae_cli.main: "unimedvl-train-vae",
         inference_cli.vqa_main: "unimedvl-vqa", inference_cli.generate_main: "unimedvl-generate",
         inference_cli.edit_main: "unimedvl-edit", eval_cli.main: "unimedvl-eval",
         cli.eval_vqa_main: "unimedvl-eval-vqa", demo.main: "unimedvl-demo"}


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_error_line_and_status_2(case, files, capsys):
    _, main, argv, expected = {c[0]: c for c in _cases(files)}[case]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == entry_point.USAGE_EXIT
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROGS[main]}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_every_command_is_covered():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) - set(PROGS.values()) <= {"unimedvl-compile"}  # compile_cli: reads no user file


def test_debug_shows_the_traceback_and_bugs_always_do(files, capsys):
    with pytest.raises(UserError, match="truncated or corrupt"):
        cli.import_main(["--official", str(files / "truncated"), "--out", str(files / "o"), "--debug"])
    command = entry_point.Command("prog", "doc", lambda fv: None)

    def bug(args):
        raise TypeError("a bug of ours")

    with pytest.raises(TypeError, match="a bug of ours"):
        command.run(bug, [])

    def write_error(args):
        raise OSError(27, "File too large", "metrics.jsonl")  # not bad input: keeps its traceback

    with pytest.raises(OSError):
        command.run(write_error, [])
    assert capsys.readouterr().err == ""


def test_what_counts_as_a_user_error(tmp_path):
    missing = tmp_path / "none.json"
    for error in (UserError("x"), FileNotFoundError(2, "No such file or directory", str(missing)),
                  PermissionError(13, "Permission denied", "f"), IsADirectoryError(21, "Is a directory", "d")):
        assert is_user_error(error)
    for error in (TypeError("x"), KeyError("x"), ValueError("x"), OSError(28, "No space left on device", "f")):
        assert not is_user_error(error)
    assert describe(FileNotFoundError(2, "No such file or directory", str(missing))) == \
        f"{missing}: No such file or directory"
    assert describe(UserError("a\n  b\n  c")) == "a; b; c"
    assert describe(UserError("3 problems:\n  x\n  y")) == "3 problems: x; y"
    assert len(describe(UserError("x" * 5000))) < 2100
    (tmp_path / "bad.json").write_bytes(b'{"a": 1,\n "b": \xff}')
    with pytest.raises(UserError, match=r"bad\.json: not a JSON file: byte 15 \(line 2\) is not UTF-8"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(UserError, match=r"bad\.json: not a valid JSON file: Expecting value at line 2 column 7"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError) as e:
        read_json(missing)
    assert describe(e.value) == f"{missing}: No such file or directory (JSON file)"


def test_console_scripts_print_one_line_and_a_traceback_with_debug(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    argv = [str(BIN / "unimedvl-import"), "--official", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"unimedvl-import: error: {tmp_path / 'missing' / 'llm_config.json'}: missing (an official checkpoint "
        "directory needs it)"]
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: ")


def test_weights_of_other_shapes_and_a_damaged_params_checkpoint(tmp_path, capsys):
    """A params checkpoint whose config.json describes another model, and one whose array file is truncated."""
    from flax import nnx

    from unimedvl_jax.interop.params_checkpoint import save_params_checkpoint
    from unimedvl_jax.models.unimedvl import UniMedVL
    from unimedvl_jax.testing import small_model_config

    cfg = small_model_config()
    with nnx.use_eager_sharding(False):
        save_params_checkpoint(tmp_path / "ck", UniMedVL(cfg, rngs=nnx.Rngs(0)), cfg)
    other = pathlib.Path(shutil.copytree(tmp_path / "ck", tmp_path / "other"))
    config = json.loads((other / "config.json").read_text())
    config["llm"]["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    damaged = pathlib.Path(shutil.copytree(tmp_path / "ck", tmp_path / "damaged"))
    biggest = max((p for p in (damaged / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])
    for ckpt, expected in ((other, f"{other / 'params'}: the weights do not match the model of {other}/config.json"),
                           (damaged, f"{damaged / 'params'}: cannot restore the params weights")):
        with pytest.raises(SystemExit) as e:
            cli.export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--weights", "params"])
        assert e.value.code == entry_point.USAGE_EXIT
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("unimedvl-export: error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"unimedvl-export: error: {expected}"), err
        if ckpt == other:  # (a failed tensorstore read may leave asyncio noise of reads still in flight)
            assert err.count("\n") == 1, err
