"""Test-wide setup: logical axis names are metadata only (no mesh), fp32 everywhere; the heavy modules run first,
heaviest first (HEAVY_MODULES)."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

nnx.use_eager_sharding(False)

OFFICIAL = pathlib.Path(__file__).parent / "fixtures" / "official"

# The modules that take longest (module fixtures that train, run multi-process jobs or compile), with their rough
# total seconds on 2 cores (`--durations`, 2026-12-02). With `-n 2` every module runs on one xdist worker
# (pyproject: --dist loadfile, so a module fixture is computed once, not once per worker); these are collected
# first, heaviest first, so that no 7-minute module starts last while the other worker idles (in the first CI run
# with it the wall time stayed ~26 min: the heavy modules then run side by side and each is slower).
HEAVY_MODULES = {
    "train/test_step.py": 420, "train/test_loop.py": 330, "faults/test_checkpoint_faults.py": 270,
    "faults/test_lost_process.py": 230, "launch/test_local_harness.py": 220, "train/test_step_sharding.py": 115,
    "test_compile_cli.py": 100, "models/test_layer_stack.py": 80, "train/test_vae_training.py": 45,
    "test_cli_help.py": 40,
}


@pytest.fixture(scope="session")
def official_dir() -> pathlib.Path:
    """Directory holding the official tiny checkpoint and recorded fixtures (copied from shared/reference)."""
    return OFFICIAL


@pytest.fixture(scope="session")
def official_manifest(official_dir) -> dict:
    """The fixtures' manifest.json (what every recorded tensor means, the official call's arguments)."""
    import json

    return json.loads((official_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def official_tensors(official_dir):
    """name -> {key: array} of tests/fixtures/official/<name>.safetensors."""
    from unimedvl_jax.interop.safetensors_io import SafetensorsReader

    def read(name: str) -> dict:
        with SafetensorsReader(official_dir / f"{name}.safetensors") as r:
            return {k: r.get(k) for k in r.keys()}

    return read


@pytest.fixture(scope="session")
def official_model(official_dir):
    """The official tiny checkpoint imported in fp32."""
    from unimedvl_jax.interop.checkpoint_import import import_official

    return import_official(official_dir / "tiny_ckpt")[0]


class OfficialByteTokenizer:
    """The fixture harness's tokenizer stand-in: id = byte_offset + utf-8 byte, no BOS/EOS (fixture_config.json)."""

    def __init__(self, byte_offset: int):
        self.byte_offset = byte_offset

    def encode(self, text: str) -> list[int]:
        return [self.byte_offset + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        raw = bytes(i - self.byte_offset for i in ids if 0 <= i - self.byte_offset < 256)
        return raw.decode("utf-8", errors="replace")


@pytest.fixture(scope="session")
def official_tokenizer(official_dir) -> OfficialByteTokenizer:
    """Tokenizer the official fixtures were recorded with."""
    import json

    config = json.loads((official_dir / "tiny_ckpt" / "fixture_config.json").read_text())
    return OfficialByteTokenizer(config["tokenizer"]["byte_offset"])


# grain worker processes parse absl flags on start; mark them parsed (docs/architecture.md "Library notes").
from absl import flags as _absl_flags  # noqa: E402

_absl_flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def unimed_mini_dir(tmp_path_factory) -> pathlib.Path:
    """unimed-mini built once per test session (a TFDS data dir); tests only read it."""
    from data_pipelines import build

    data_dir = tmp_path_factory.mktemp("unimed_mini")
    assert build.main(["--dataset", "unimed-mini", "--data-dir", str(data_dir)]) == 0
    return data_dir


def pytest_collection_modifyitems(config, items):
    """HEAVY_MODULES first, heaviest first (a stable sort: every module's tests stay together and in order)."""
    root = pathlib.Path(__file__).parent

    def module(item):
        return item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""

    items.sort(key=lambda item: -HEAVY_MODULES.get(module(item), 0))
