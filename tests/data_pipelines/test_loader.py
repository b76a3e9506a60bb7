"""End to end from scratch: the build command writes unimed-mini shards, the loader trains a tokenizer on them and
streams PackedBatches that the tiny model consumes."""

import numpy as np
import pytest

from configs import tiny
from data_pipelines import build
from data_pipelines.loader import get_tokenizer, make_iterator, open_split


@pytest.fixture(scope="module")
def built(unimed_mini_dir):
    return unimed_mini_dir


def test_build_is_cached(built, capsys):
    assert build.main(["--dataset", "unimed-mini", "--data-dir", str(built)]) == 0
    assert "already built" in capsys.readouterr().out


def test_loader_streams_unimed_mini_batches(built, tmp_path):
    cfg = tiny.get_config()
    cfg.data.data_dir = str(built)
    cfg.curriculum.stage_steps = (2, 2, 2)
    tok = get_tokenizer(cfg.data, cfg.model, workdir=str(tmp_path))
    assert (tmp_path / "tokenizer").is_dir()  # cached for the next run
    it = make_iterator(cfg, tok)
    stages, tasks = [], set()
    for _ in range(6):
        batch = next(it)
        stages.append(int(batch.stage))
        tasks.update(it.last_pack_tasks)
        assert batch.text_ids.shape == (cfg.data.max_tokens,)
        assert np.all(batch.text_ids < cfg.model.llm.vocab_size)
    assert stages == [0, 0, 1, 1, 2, 2]
    assert tasks == {"understanding", "generation", "interleaved"}
    assert it.bad_records.total == 0
    with pytest.raises(FileNotFoundError, match="dataset not built; run"):
        cfg.data.dataset = "no_such_dataset"
        open_split(cfg.data, "train")
