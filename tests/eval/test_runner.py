"""The evaluation runs on a tiny random model. VQA: batch 1 and batch 4 give the predictions the single-question
path gives, an interrupted run continues without answering an item twice (an unfinished last line included),
result files of other settings or items are refused with the file named. FID: prompts generated with their own
seeds, resumed, scored per modality against the reference folders (a cheap feature map stands in for
InceptionV3, whose weights come from a package the tests do not install)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from unimedvl_jax.eval.fid import fid_from_features
from unimedvl_jax.eval.generation_fid import evaluate_fid, read_fid_data, summarize_fid
from unimedvl_jax.eval.items import EvalItem
from unimedvl_jax.eval.progress import Progress
from unimedvl_jax.eval.report import render_markdown
from unimedvl_jax.eval.results_store import ResultsError, check_settings, read_results
from unimedvl_jax.eval.runner import answer_items, prompt_length, run_cache_size
from unimedvl_jax.eval.vqa import answer_image
from unimedvl_jax.inference.interleave import text_to_image
from unimedvl_jax.inference.loading import load_for_inference
from unimedvl_jax.testing import save_small_inference_workdir

QUESTIONS = ["What imaging modality is this?", "Is this a CT scan of the chest?", "Which plane is this slice?",
             "Is there an abnormality?"]
CORPUS = QUESTIONS + ["This is a CT scan of the chest.", "An axial brain MRI slice.", "yes", "no"] * 20
SIZES = [(40, 52), (28, 28), (60, 30), (33, 47), (56, 56), (29, 41), (50, 35)]  # one per item


def png(seed: int, hw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((*hw, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_items(n=7):
    return [EvalItem("manifest", f"q{i}", (png(i, SIZES[i % len(SIZES)]),), QUESTIONS[i % len(QUESTIONS)],
                     "yes", "closed", categories={"modality": "CT" if i % 2 else "MRI"}) for i in range(n)]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    run = save_small_inference_workdir(tmp_path_factory.mktemp("eval") / "run", CORPUS)
    return load_for_inference(run)


def predictions(out_dir):
    return {k: v["prediction"] for k, v in read_results(out_dir, "predictions").items()}


def file_ids(path):
    return [json.loads(line)["item_id"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(loaded):
    """The answers of the one-question path (eval.vqa.answer_image, its own cache size)."""
    return {item.item_id: answer_image(loaded.model, loaded.tokenizer, loaded.vit_transform,
                                       Image.open(io.BytesIO(item.images[0])), item.question,
                                       max_new_tokens=6) for item in make_items()}


def test_batch_1_and_batch_4_answer_like_the_single_question_path(loaded, reference, tmp_path):
    items = make_items()
    assert len({prompt_length(i, loaded) for i in items}) > 3      # prompts of different lengths share batches
    assert run_cache_size(items, loaded, 6) == 256
    for batch in (1, 4):
        stats = answer_items(loaded, items, tmp_path / f"b{batch}", batch_size=batch, max_new_tokens=6,
                             progress=False)
        assert (stats.done_now, stats.skipped, stats.share) == (7, 0, 7)
        assert predictions(tmp_path / f"b{batch}") == reference, batch
        rows = [json.loads(line) for line in (tmp_path / f"b{batch}" / "predictions.process0.jsonl").read_text()
                .splitlines()]
        assert [r["item_id"] for r in rows] == [f"q{i}" for i in range(7)]
        assert all(set(r) == {"item_id", "prediction", "seconds"} and r["seconds"] > 0 for r in rows)
    assert len(set(reference.values())) > 1  # not one constant answer: rows really differ


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_answering_an_item_twice(loaded, reference, tmp_path):
    items = make_items()

    def stop_after_first(batch):
        raise Interrupt

    with pytest.raises(Interrupt):
        answer_items(loaded, items, tmp_path, batch_size=3, max_new_tokens=6, on_batch=stop_after_first,
                     progress=False)
    path = tmp_path / "predictions.process0.jsonl"
    assert file_ids(path) == ["q0", "q1", "q2"]
    # a write cut off in the middle of the next batch's first line
    with open(path, "a") as f:
        f.write('{"item_id": "q3", "predic')
    seen = []
    stats = answer_items(loaded, items, tmp_path, batch_size=3, max_new_tokens=6, on_batch=seen.extend,
                         progress=False)
    assert [i.item_id for i in seen] == ["q3", "q4", "q5", "q6"]
    assert (stats.skipped, stats.done_now) == (3, 4)
    assert file_ids(path) == [f"q{i}" for i in range(7)]            # the cut-off line is gone, nothing twice
    assert predictions(tmp_path) == reference
    seen.clear()
    stats = answer_items(loaded, items, tmp_path, batch_size=3, max_new_tokens=6, on_batch=seen.extend,
                         progress=False)
    assert seen == [] and (stats.skipped, stats.done_now, stats.items_per_s) == (7, 0, None)


def test_limited_run_then_full_run(loaded, reference, tmp_path):
    items = make_items()
    answer_items(loaded, items[:2], tmp_path, batch_size=4, max_new_tokens=6, cache_items=items, progress=False)
    seen = []
    answer_items(loaded, items, tmp_path, batch_size=4, max_new_tokens=6, on_batch=seen.extend, progress=False)
    assert [i.item_id for i in seen] == ["q2", "q3", "q4", "q5", "q6"]
    assert predictions(tmp_path) == reference


def test_foreign_or_conflicting_results_are_refused(loaded, tmp_path):
    items = make_items(2)
    (tmp_path / "predictions.process1.jsonl").write_text('{"item_id": "zz", "prediction": "x", "seconds": 1}\n')
    with pytest.raises(ResultsError, match=r"predictions.process1.jsonl:1: item 'zz' is not an item"):
        answer_items(loaded, items, tmp_path, batch_size=2, max_new_tokens=2, progress=False)
    (tmp_path / "predictions.process1.jsonl").write_text('{"item_id": "q0", "prediction": "a", "seconds": 1}\n'
                                                        'not json\n')
    with pytest.raises(ResultsError, match=r"predictions.process1.jsonl:2: not JSON"):
        read_results(tmp_path, "predictions")
    (tmp_path / "predictions.process1.jsonl").write_text('{"item_id": "q0", "prediction": "a", "seconds": 1}\n')
    (tmp_path / "predictions.process2.jsonl").write_text('{"item_id": "q0", "prediction": "b", "seconds": 2}\n')
    with pytest.raises(ResultsError, match=r"process2.jsonl:1: item 'q0' was already recorded at .*process1"):
        read_results(tmp_path, "predictions")
    (tmp_path / "predictions.process2.jsonl").write_text('{"item_id": "q0", "prediction": "a", "seconds": 9}\n')
    assert read_results(tmp_path, "predictions")["q0"]["prediction"] == "a"  # same answer, other timing: fine
    check_settings(tmp_path, {"benchmark": "manifest", "max_new_tokens": 6}, write=True)
    check_settings(tmp_path, {"benchmark": "manifest", "max_new_tokens": 6}, write=False)
    with pytest.raises(ResultsError, match=r"run.json: .*max_new_tokens: saved 6, now 8"):
        check_settings(tmp_path, {"benchmark": "manifest", "max_new_tokens": 8}, write=True)
    for path in tmp_path.glob("predictions.process*.jsonl"):  # no results to mix: the new settings replace them
        path.unlink()
    check_settings(tmp_path, {"benchmark": "manifest", "max_new_tokens": 8}, write=True)
    assert json.loads((tmp_path / "run.json").read_text())["max_new_tokens"] == 8


def small_features(images):
    """A cheap stand-in feature map: 6×6 grey thumbnails (36-d)."""
    return np.stack([np.asarray(Image.fromarray(im).convert("L").resize((6, 6)), np.float64).ravel() / 255
                     for im in images])


@pytest.fixture
def fid_data(tmp_path):
    """prompts.jsonl (3 CT, 2 MRI prompts, a comment line) and reference folders CT/ (3), MRI/ (2), US/ (2)."""
    base = tmp_path / "t2i"
    for modality, n in (("CT", 3), ("MRI", 2), ("US", 2)):
        (base / modality).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((np.random.default_rng(100 + i).random((20 + i, 24, 3)) * 255).astype(np.uint8)) \
                .save(base / modality / f"{i}.png")
    lines = ["# t2i prompts", json.dumps({"modality": "CT", "prompt": "An axial CT slice."}),
             json.dumps({"id": "mri-a", "modality": "MRI", "prompt": "An axial brain MRI slice."}),
             json.dumps({"modality": "CT", "prompt": "A chest CT."}),
             json.dumps({"modality": "MRI", "prompt": "A sagittal MRI."}),
             json.dumps({"modality": "CT", "prompt": "A head CT."})]
    (base / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return base


def test_fid_generates_with_own_seeds_resumes_and_scores_per_modality(loaded, fid_data, tmp_path):
    data = read_fid_data(fid_data)
    assert [p.item_id for p in data.prompts] == ["2", "mri-a", "4", "5", "6"]    # default id: the line number
    out, sampler = tmp_path / "fid", {"num_timesteps": 2}
    evaluate_fid(loaded, data.prompts[:2], out, image_size=(16, 16), seed=7, sampler=sampler,
                 all_prompts=data.prompts, progress=False)
    seen = []
    stats = evaluate_fid(loaded, data.prompts, out, image_size=(16, 16), seed=7, sampler=sampler,
                         on_batch=seen.extend, progress=False)
    assert [p.item_id for p in seen] == ["4", "5", "6"] and stats.skipped == 2
    results = read_results(out, "generated")
    assert results["mri-a"]["image"] == "generated/MRI/mri-a.png"
    # prompt i is drawn with seed 7 + i, whatever run or process generated it
    want = text_to_image(loaded.model, loaded.tokenizer, "A chest CT.", image_shape=(16, 16), seed=9, **sampler)
    np.testing.assert_array_equal(np.asarray(Image.open(out / results["4"]["image"])), want.image)
    summary = summarize_fid(small_features, data, data.prompts, results, out)
    ct = summary["by_modality"]["CT"]
    assert (ct["generated"], ct["reference"]) == (3, 3)
    gen = small_features([np.asarray(Image.open(out / results[i]["image"])) for i in ("2", "4", "6")])
    ref = small_features([np.asarray(Image.open(p)) for p in data.references["CT"]])
    assert ct["fid"] == pytest.approx(fid_from_features(gen, ref)) and ct["fid"] > 0
    assert summary["average_fid"] == pytest.approx((ct["fid"] + summary["by_modality"]["MRI"]["fid"]) / 2)
    assert summary["unused_reference_modalities"] == ["US"] and summary["missing_images"] == 0
    partial = summarize_fid(small_features, data, data.prompts, {k: results[k] for k in ("2", "4", "mri-a")}, out)
    assert partial["missing_images"] == 2 and partial["by_modality"]["MRI"]["fid"] is None    # 1 image: no FID
    assert partial["modalities_without_fid"] == ["MRI"]
    report = {"kind": "fid", "benchmark": "fid", "model": "tiny", "scores": summary, "paper": {"gfid": 96.29,
              "biomedclip": 0.706}, "settings": {"checkpoint": "c", "data": "d"},
              "run": {"done_this_run": 3, "done_earlier": 2, "processes": 1, "devices_per_process": 1,
                      "batch_size": 1, "seconds": 1.0, "items_per_s": 3.0}}
    md = render_markdown(report)
    assert "| CT | 3 | 3 |" in md and "average over 2 modalities" in md and "gFID 96.29" in md


def test_fid_data_errors_name_the_file(fid_data):
    prompts = fid_data / "prompts.jsonl"
    text = prompts.read_text()
    prompts.write_text(text + json.dumps({"id": "mri-a", "modality": "MRI", "prompt": "again"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:7: id 'mri-a' already used at line 3"):
        read_fid_data(fid_data)
    prompts.write_text(text + json.dumps({"modality": "OCT", "prompt": "A retina OCT."}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"OCT: no reference folder"):
        read_fid_data(fid_data)
    prompts.write_text(text + json.dumps({"modality": "US", "prompt": "x", "seed": 3}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:7: unknown field\(s\) \['seed'\]"):
        read_fid_data(fid_data)
    prompts.write_text(text)
    (fid_data / "MRI" / "1.png").unlink()
    with pytest.raises(ValueError, match=r"MRI: 1 reference image\(s\).*at least 2"):
        read_fid_data(fid_data)


def test_progress_line_shows_rate_and_eta_and_throttles_off_a_terminal():
    now, stream = [0.0], io.StringIO()
    bar = Progress(10, "answering", stream=stream, clock=lambda: now[0], width=10)
    now[0] = 2.0
    bar.advance(4)
    now[0] = 3.0
    bar.advance(2)                       # within 5 s of the last line, not a terminal: not drawn
    now[0] = 5.0
    bar.advance(4)                       # the last one always is
    assert stream.getvalue().splitlines() == [
        "answering: 4/10 [####......] 2.00 items/s, elapsed 0:02, ETA 0:03",
        "answering: 10/10 [##########] 2.00 items/s, elapsed 0:05, ETA 0:00"]
