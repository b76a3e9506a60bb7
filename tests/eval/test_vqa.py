"""VQA evaluation: item extraction from records, normalised exact match, per-modality accuracy and baseline."""

import numpy as np
import pytest
from flax import nnx

from configs import tiny
from data_pipelines import schema
from data_pipelines.transforms import ImageTransform
from unimedvl_jax.eval.vqa import evaluate, family_items, normalize, vqa_items
from unimedvl_jax.models.unimedvl import UniMedVL
from unimedvl_jax.tokenizers import SentencePieceTokenizer

Q = ("What imaging modality is this?",)


def record(rid, modality, qa, task="understanding", scan=None):
    png = schema.encode_png(np.random.default_rng(len(rid)).integers(0, 256, (28, 42), dtype=np.uint8))
    segs = [schema.Segment("image", "input", image=0)]
    for q, a in qa:
        segs += [schema.Segment("text", "context", text=q), schema.Segment("text", "answer", text=a)]
    rec = schema.Record(id=rid, task=task, segments=segs, images=[png], modality=modality, split="test",
                        source="synthetic", source_scan=scan or rid, license="CC0")
    return {"record": rec.to_bytes(), "id": rid, "task": task}


def test_normalize():
    assert normalize("  MRI. ") == normalize("mri") == "mri"
    assert normalize("PA (posteroanterior)") == "pa posteroanterior"


def test_items_and_scores():
    source = [record("a", "MRI", [("Is this axial?", "yes"), ("What imaging modality is this?", "MRI")]),
              record("b", "CT", [("What  imaging modality is this?", "CT")]),
              record("c", "CT", [("Which body region is shown?", "head")])]
    items = vqa_items(source, Q)
    assert [(i.record_id, i.answer) for i in items] == [("a", "MRI"), ("b", "CT")]
    cfg = tiny.get_config().model
    tok = SentencePieceTokenizer.train(["What imaging modality is this? MRI CT"] * 50, vocab_size=cfg.llm.vocab_size,
                                       special_ids=dict(cfg.special_tokens))
    res = evaluate(UniMedVL(cfg, rngs=nnx.Rngs(0)), tok, ImageTransform(56, 28, 14), items, max_new_tokens=3)
    assert res["n"] == 2 and set(res["per_modality"]) == {"CT", "MRI"}
    assert res["majority_baseline"] == pytest.approx(0.5)
    correct = [r["correct"] for r in res["answers"]]
    assert res["accuracy"] == pytest.approx(np.mean(correct))
    assert all(r["correct"] == (normalize(r["predicted"]) == normalize(r["answer"])) for r in res["answers"])


def test_family_items_spread_over_each_scan():
    plane = ("In which anatomical plane is this slice?",)
    source = [record(f"v{i}", "MRI", [("In which anatomical plane is this slice?", "axial"),
                                      ("What imaging modality is this?", "MRI")], scan="volume") for i in range(9)]
    source += [record("ct", "CT", [("What imaging modality is this?", "CT")])]
    items = family_items(source, {"plane": plane, "modality": Q}, max_per_scan=3)
    assert [i.record_id for i in items["plane"]] == ["v0", "v4", "v8"]          # evenly spread, not the first 3
    assert [i.record_id for i in items["modality"]] == ["v0", "v4", "v8", "ct"]
    assert {i.source_scan for i in items["modality"]} == {"volume", "ct"}
    assert len(family_items(source, {"plane": plane})["plane"]) == 9             # no cap


def test_macro_accuracy_counts_modalities_with_enough_scans():
    source = [record("m1", "MRI", [Q + ("MRI",)], scan="s1"), record("m2", "MRI", [Q + ("MRI",)], scan="s2"),
              record("m3", "MRI", [Q + ("MRI",)], scan="s2"), record("c1", "CT", [Q + ("CT",)], scan="s3"),
              record("c2", "CT", [Q + ("CT",)], scan="s4"), record("u1", "US", [Q + ("ultrasound",)], scan="s5")]
    items = vqa_items(source, Q)
    cfg = tiny.get_config().model
    tok = SentencePieceTokenizer.train(["What imaging modality is this? MRI CT ultrasound"] * 50,
                                       vocab_size=cfg.llm.vocab_size, special_ids=dict(cfg.special_tokens))
    res = evaluate(UniMedVL(cfg, rngs=nnx.Rngs(0)), tok, ImageTransform(56, 28, 14), items, max_new_tokens=3)
    assert res["macro_modalities"] == ["CT", "MRI"]                             # US has one scan
    assert res["per_modality"]["MRI"]["scans"] == 2 and res["per_modality"]["MRI"]["n"] == 3
    assert res["majority_answer"] == "mri" and res["majority_baseline"] == pytest.approx(0.5)
    assert res["per_modality"]["MRI"]["majority_baseline"] == 1.0
    assert res["per_modality"]["CT"]["majority_baseline"] == 0
    assert res["majority_macro"] == pytest.approx(0.5)
    per_modality = [res["per_modality"][m]["accuracy"] for m in ("CT", "MRI")]
    assert res["macro_accuracy"] == pytest.approx(np.mean(per_modality))
