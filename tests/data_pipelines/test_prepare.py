"""ensure_dataset builds only the embedded dataset and says how to build anything else; summary reads a build."""

import types

import pytest

from data_pipelines import prepare, tfds_builder


def test_ensure_dataset_builds_unimed_mini_only(tmp_path, monkeypatch):
    calls, printed = [], []

    def fake_build(source, data_dir):
        calls.append((source.name, str(data_dir)))
        return types.SimpleNamespace(data_dir=str(tmp_path / "built")), True

    monkeypatch.setattr(tfds_builder, "build", fake_build)
    monkeypatch.setattr(prepare, "summary", lambda path: f"summary of {path}")
    data_cfg = types.SimpleNamespace(data_dir=str(tmp_path / "data"), dataset="unimed_mini")
    path = prepare.ensure_dataset(data_cfg, console=printed.append)
    assert calls == [("unimed_mini", str(tmp_path / "data"))]
    assert path == tfds_builder.dataset_dir(tmp_path / "data", "unimed_mini")
    assert "building unimed-mini" in printed[0] and printed[1] == f"summary of {tmp_path / 'built'}"
    data_cfg.dataset = "manifest_x_123"
    with pytest.raises(FileNotFoundError, match="--dataset manifest --manifest FILE"):
        prepare.ensure_dataset(data_cfg, console=printed.append)
    assert len(calls) == 1


def test_summary_of_a_built_dataset(unimed_mini_dir):
    text = prepare.summary(tfds_builder.dataset_dir(unimed_mini_dir, "unimed_mini"))
    assert text.startswith("dataset: ") and "train records=" in text and "bad records: 0" in text
