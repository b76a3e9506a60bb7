"""unimedvl-eval end to end on a tiny random model saved as a training workdir: a manifest-format benchmark (a
--limit run, then the full run continuing it), 2 processes × 4 CPU devices against 1 process (launch/local.py,
rows split over the devices), an image-to-image pairs file, and bad command lines."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unimedvl_jax import entry_point, eval_cli
from unimedvl_jax.eval.results_store import read_results
from unimedvl_jax.testing import save_small_inference_workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUESTIONS = ["What imaging modality is this?", "Is this a CT scan?", "Which plane is this slice?",
             "Is there an abnormality?"]
CORPUS = QUESTIONS + ["Increase the resolution of this image by 2x.", "CT", "MRI", "yes", "no", "axial"] * 20
N_RECORDS = 7  # understanding records of the test split, 2 questions each → 14 items


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return save_small_inference_workdir(tmp_path_factory.mktemp("evalcli") / "run", CORPUS)


def _png(path, seed, hw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((*hw, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """manifest.jsonl: 7 test-split understanding records (2 question/answer pairs each), one train record, one
    generation record and one line that is not JSON."""
    base = tmp_path_factory.mktemp("bench")
    lines = []
    for i in range(N_RECORDS):
        _png(base / "img" / f"{i}.png", i, (30 + 4 * i, 50 - 3 * i))
        modality = ("CT", "MRI")[i % 2]
        lines.append({"id": f"r{i}", "task": "understanding", "modality": modality, "license": "CC0",
                      "split": "test", "segments": [{"image": f"img/{i}.png"},
                                                    {"question": QUESTIONS[i % 4]}, {"answer": modality},
                                                    {"question": QUESTIONS[(i + 1) % 4]}, {"answer": "yes"}]})
    lines.append({"id": "t0", "task": "understanding", "modality": "CT", "license": "CC0", "split": "train",
                  "segments": [{"image": "img/0.png"}, {"question": QUESTIONS[0]}, {"answer": "CT"}]})
    lines.append({"id": "g0", "task": "generation", "modality": "CT", "license": "CC0", "split": "test",
                  "segments": [{"text": "An axial CT slice."}, {"image": "img/1.png"}]})
    path = base / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return path


def args_for(workdir, manifest, out, *extra):
    return ["--benchmark", "manifest", "--data", str(manifest), "--checkpoint", str(workdir), "--out", str(out),
            "--split", "test", "--max-new-tokens", "5", *extra]


def ids_in_order(out):
    return [json.loads(line)["item_id"] for line in (out / "predictions.process0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(workdir, manifest, tmp_path_factory):
    """One process: a --limit 4 run, then the full run continuing it."""
    out = tmp_path_factory.mktemp("single") / "eval"
    assert eval_cli.main(args_for(workdir, manifest, out, "--limit", "4", "--batch-size", "3")) == 0
    limited = json.loads((out / "report.json").read_text())
    first_ids = ids_in_order(out)
    assert eval_cli.main(args_for(workdir, manifest, out, "--batch-size", "4")) == 0
    return {"out": out, "limited": limited, "first_ids": first_ids,
            "report": json.loads((out / "report.json").read_text()), "md": (out / "report.md").read_text()}


def test_limited_run_then_full_run_continues_without_answering_twice(single):
    assert single["limited"]["scores"]["n"] == 4 and single["limited"]["run"]["done_this_run"] == 4
    ids = ids_in_order(single["out"])
    assert ids[:4] == single["first_ids"] == ["r0#0", "r0#1", "r1#0", "r1#1"]
    assert len(ids) == len(set(ids)) == 2 * N_RECORDS                        # nothing answered twice
    run = single["report"]["run"]
    assert (run["done_earlier"], run["done_this_run"], run["processes"]) == (4, 2 * N_RECORDS - 4, 1)
    assert run["items_per_s"] > 0


def test_report_has_scores_breakdowns_reading_and_paper_table(single):
    report, md = single["report"], single["md"]
    scores = report["scores"]
    assert scores["n"] == 2 * N_RECORDS and scores["missing_predictions"] == 0
    assert set(scores["by_category"]) == {"modality", "question", "source"}
    assert scores["by_category"]["modality"]["CT"]["n"] == 8                  # records 0, 2, 4, 6 (2 each)
    reading = report["reading"]
    assert reading["items"] == 2 * N_RECORDS and reading["bad_rows"] == 1
    assert reading["filtered"] == {"split=train": 1, "task=generation": 1}
    assert report["paper"] == {"accuracy": None}                              # the paper has no manifest number
    assert report["settings"]["max_new_tokens"] == 5 and report["settings"]["limit"] is None
    preds = read_results(single["out"], "predictions")
    assert len(preds) == 2 * N_RECORDS
    assert "| accuracy (%) | 14 |" in md and "UniMedVL (paper)" in md and "### By modality" in md
    assert "protocol details unverified" in md


def test_other_settings_in_the_same_out_are_refused(single, workdir, manifest, capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(args_for(workdir, manifest, single["out"]) + ["--max-new-tokens", "7"])
    assert e.value.code == entry_point.USAGE_EXIT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"^unimedvl-eval: error: .*run.json: .*max_new_tokens: saved 5, now 7", line), line


def test_two_processes_of_four_devices_answer_like_one_process(single, workdir, manifest, tmp_path):
    out = tmp_path / "two"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    for key in [k for k in env if k.startswith(("UNIMEDVL_", "SLURM_"))]:
        del env[key]
    cmd = [sys.executable, "launch/local.py", "-n", "2", "-d", "4", "--", sys.executable, "-m",
           "unimedvl_jax.eval_cli", *args_for(workdir, manifest, out, "--batch-size", "3", "--row-sharding", "on",
                                              "--noprogress")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "process 0 of 2, 4 local device(s)" in proc.stderr
    files = {i: [json.loads(line)["item_id"] for line in (out / f"predictions.process{i}.jsonl").read_text()
                 .splitlines()] for i in (0, 1)}
    items = [f"r{i // 2}#{i % 2}" for i in range(2 * N_RECORDS)]              # the reader's order
    assert files[0] == items[0::2] and files[1] == items[1::2]                # process p answered items[p::2]
    two = {k: r["prediction"] for k, r in read_results(out, "predictions").items()}
    one = {k: r["prediction"] for k, r in read_results(single["out"], "predictions").items()}
    assert two == one
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["processes"] == 2 and report["run"]["devices_per_process"] == 4
    assert report["run"]["row_sharding"] is True and report["run"]["done_this_run"] == 2 * N_RECORDS
    assert report["scores"] == single["report"]["scores"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """pairs.jsonl: three input/target pairs of two tasks."""
    base = tmp_path_factory.mktemp("pairs")
    lines = []
    for i, (task, modality) in enumerate([("mri-sr-4x", "MRI"), ("mri-sr-4x", "MRI"), ("t2-flair", "MRI")]):
        _png(base / f"in{i}.png", 10 + i, (40, 52))
        _png(base / f"out{i}.png", 20 + i, (48, 64))
        lines.append({"id": f"p/{i}", "input": f"in{i}.png", "target": f"out{i}.png", "task": task,
                      "modality": modality, "instruction": "Increase the resolution of this image by 2x."})
    (base / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return base / "pairs.jsonl"


def test_paired_tasks_psnr_ssim_per_task_with_saved_images(workdir, pairs, tmp_path):
    out = tmp_path / "paired"
    argv = ["--benchmark", "paired", "--data", str(pairs), "--checkpoint", str(workdir), "--out", str(out),
            "--steps", "2", "--save-images"]
    assert eval_cli.main(argv + ["--limit", "1"]) == 0
    assert eval_cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    scores = report["scores"]
    assert scores["n"] == scores["scored"] == 3 and scores["missing_results"] == 0
    assert set(scores["by_category"]["task"]) == {"mri-sr-4x", "t2-flair"}
    assert scores["by_category"]["task"]["mri-sr-4x"]["n"] == 2
    assert scores["target_resized"] == 3                                     # 48x64 targets, 24x32 outputs
    results = read_results(out, "paired")
    assert [r["size"] for r in results.values()] == [[24, 32]] * 3
    assert np.mean([r["psnr"] for r in results.values()]) == pytest.approx(scores["psnr"])
    assert all(0 < r["psnr"] < 40 and -1 <= r["ssim"] <= 1 for r in results.values())
    saved = sorted(p.name for p in (out / "images").iterdir())
    assert saved == ["p_0.png", "p_1.png", "p_2.png"]
    assert np.asarray(Image.open(out / "images" / "p_0.png")).shape == (24, 32, 3)
    assert report["run"]["done_earlier"] == 1 and report["run"]["done_this_run"] == 2
    md = (out / "report.md").read_text()
    assert "| mri-sr-4x | 2 |" in md and "27.29" in md and "25.07" in md    # paper rows next to ours
    assert "he-to-ihc (H&E→IHC virtual staining; not in this run)" in md


def test_bad_command_lines_exit_2(workdir, manifest, tmp_path, capsys):
    cases = [(["--prompt-template", "yesno={question}"], "expected ANSWER_TYPE=TEMPLATE"),
             (["--save-images"], "--save-images does not apply to --benchmark manifest"),
             (["--steps", "3"], "--steps does not apply")]
    paired = ["--benchmark", "paired", "--data", str(manifest), "--checkpoint", str(workdir), "--out",
              str(tmp_path / "x")]
    cases = [(args_for(workdir, manifest, tmp_path / "x", *extra), message) for extra, message in cases]
    cases += [(paired + ["--batch-size", "4"], "--batch-size does not apply to --benchmark paired"),
              (paired + ["--max-new-tokens", "4"], "--max-new-tokens does not apply to --benchmark paired")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            eval_cli.main(argv)
        assert e.value.code == entry_point.USAGE_EXIT, argv
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["--benchmark", "manifest", "--data", str(tmp_path / "missing"), "--checkpoint",
                       str(workdir), "--out", str(tmp_path / "x")])
    assert "no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
