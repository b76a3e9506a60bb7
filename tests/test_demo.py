"""The demo's pieces on the real unimed-mini splits: expected modality answers, one train prompt per modality,
held-out super-resolution records, the labelled grid and the Markdown report. (The whole run is the README's
main job; its measured report is in the issue notes.)"""

import numpy as np
import pytest

from configs import tiny
from data_pipelines.loader import open_split
from unimedvl_jax import demo


@pytest.fixture(scope="module")
def data_cfg(unimed_mini_dir):
    cfg = tiny.get_config().data
    cfg.data_dir = str(unimed_mini_dir)
    return cfg


def test_modality_answers_are_one_per_modality(data_cfg):
    answers = demo.modality_answers(open_split(data_cfg, "train"))
    assert answers["CT"] == "CT" and answers["MRI"] == "MRI" and answers["US"] == "ultrasound"
    assert answers["CXR"] == answers["XR"] == "X-ray radiograph"


def test_one_train_prompt_per_modality(data_cfg):
    prompts = demo.generation_prompts(open_split(data_cfg, "train"))
    modalities = [p["modality"] for p in prompts]
    assert modalities == sorted(set(modalities)) and {"CT", "MRI", "US"} <= set(modalities)
    for p in prompts:
        assert p["prompt"].strip() and p["record"].endswith("/t2i")
        assert p["reference"].dtype == np.uint8 and p["reference"].ndim == 3


def test_super_resolution_records_are_held_out_and_distinct(data_cfg):
    records = demo.sr_records([(s, open_split(data_cfg, s)) for s in ("test", "val")], 3)
    assert len(records) == 3
    assert len({r.source_scan for r in records}) == 3
    for r in records:
        assert r.split in ("test", "val") and r.meta["kind"] == "sr2" and len(r.images) == 2


def test_grid_and_report():
    rows = [("T2I CT", [("a", np.zeros((40, 80, 3), np.uint8)), ("b", np.full((64, 64, 3), 255, np.uint8))]),
            ("SR MRI", [("c", np.full((16, 16, 3), 128, np.uint8))])]
    grid = demo.sample_grid(rows, cell=32)
    assert grid.shape[2] == 3 and grid.shape[0] >= 2 * 32 and grid.shape[1] >= 2 * 32
    assert (grid == 128).all(axis=-1).sum() >= 32 * 32 * 0.9          # the 16² image upscaled into its cell
    modality = {"n": 4, "accuracy": 0.75, "majority_answer": "mri", "majority_baseline": 0.5,
                "macro_modalities": ["CT", "MRI", "US", "CFP"], "macro_accuracy": 0.625, "majority_macro": 0.25,
                "per_modality": {"MRI": {"n": 4, "scans": 2, "accuracy": 0.75, "majority_baseline": 1.0}}}
    plane = {"n": 10, "accuracy": 0.7, "majority_answer": "axial", "majority_baseline": 0.4, "macro_modalities": [],
             "macro_accuracy": float("nan"), "majority_macro": float("nan"),
             "per_modality": {"MRI": {"n": 10, "scans": 1, "accuracy": 0.7, "majority_baseline": 0.4}}}
    vqa = {"test": {"modality_name": modality, "plane": plane}}
    report = {"config": "tiny", "train_steps": 9, "seconds_total": 12.0, "timings": {"x": 1.0}, "vqa": vqa,
              "generation": {"n": 2, "cycle_correct": 1, "cycle_accuracy": 0.5,
                             "prompts": [{"modality": "CT", "prompt": "p", "expected": "CT",
                                          "answers": ["CT", "MRI"]}]},
              "super_resolution": {"items": [{"record": "r", "psnr_bicubic": 30.0, "psnr_model": 20.0}],
                                   "mean_psnr_bicubic": 30.0, "mean_psnr_model": 20.0},
              "vae": {"psnr_db": {"val": 18.0}}, "export": "/x"}
    text = demo._markdown(report)
    assert "| modality_name | 4 | 0.750 | mri | 0.500 | 0.625 (4) | 0.250 |" in text
    assert "| plane | 10 | 0.700 | axial | 0.400 | — (0) | — |" in text
    assert "| MRI | 0.75 (4/2) [1.00] | 0.70 (10/1) [0.40] |" in text and "Correct: 1 / 2 = 0.500" in text
    checks = demo.learning_checks(report)
    assert checks["modality macro-accuracy"] == {"value": 0.625, "target": 0.6, "met": True}
    assert checks["plane accuracy"]["met"] is False and checks["cycle check"]["met"] is True
    assert "| plane accuracy | 0.700 | 0.8 | **no** |" in text
    assert "| r | 30.00 | 20.00 |" in text and "![samples](samples.png)" in text
    modality["macro_modalities"] = ["CT", "MRI", "US"]  # unimed-mini's test split: one modality too few
    checks = demo.learning_checks(report)
    assert checks["modality macro-accuracy"]["value"] is None and checks["modality macro-accuracy"]["met"] is False
    assert ("| modality macro-accuracy | — (3 modalities with >= 2 test scans (CT, MRI, US); the check needs 4) | "
            "0.6 | **no** |") in demo._markdown(report)
