"""tests/train/loop_config.py with a 1-layer LLM and stages of 3 + 3 + 2 steps, for the multi-process tests
(compile time dominates them). Used as `--config tests/launch/dist_config.py`."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))
import loop_config  # noqa: E402

sys.path.pop(0)


def get_config():
    cfg = loop_config.get_config()
    cfg.model.llm.num_layers = 1
    cfg.curriculum.stage_steps = (3, 3, 2)
    cfg.data.num_workers = 0
    # The disjoint-records test needs un-resampled sources: a balanced view (data.balance_alpha > 0,
    # data_pipelines/balance.py) repeats records, so one record can fall in both processes' shares.
    cfg.data.balance_alpha = 0.0
    cfg.train.update(batch_packs=8, log_every=2, checkpoint_every=3, write_final=False)
    cfg.mesh.update(shape=(2, 2, 2), rules="fsdp_tensor")
    return cfg
