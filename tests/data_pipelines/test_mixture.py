"""The UniMedVL mixture YAML: parsing (subgroups, weights, num_used_data, transforms, dataset_info, errors naming
file, line and key), mixing (a mandatory sample opens every pack, weighted groups within 3σ), exact resume,
oversize samples counted, building shards from the YAML and streaming it through loader.make_iterator."""

import json
import math

import numpy as np
import pytest
import yaml

from configs import tiny
from data_pipelines import build, tfds_builder
from data_pipelines import unimedvl_format as fmt
from data_pipelines.data_shards import DataShardLayout
from data_pipelines.loader import get_tokenizer, make_iterator, make_sharded_iterator
from data_pipelines.mixture import GroupSource, Mixture
from data_pipelines.packing import Packer
from data_pipelines.sample_plan import Planner, record_to_plan
from data_pipelines.unimedvl_stream import MixturePackIterator
from unimedvl_jax.curriculum import StageSchedule
from unimedvl_jax.errors import UserError
from unimedvl_jax.tokenizers import SentencePieceTokenizer

WORDS = "chest ct mri liver lesion axial slice brain effusion normal left right modality scan".split()
SMALL = {"image_stride": 16, "max_image_size": 32, "min_image_size": 32}
SMALL_VIT = {"image_stride": 14, "max_image_size": 28, "min_image_size": 28}


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def write_jsonl(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


@pytest.fixture
def mix_dir(tmp_path, writers):
    """Files of three datasets: T2I lines with tiny images, and two text-only sets."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for k in range(4):
        writers.png(tmp_path / "img" / f"{k}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    text = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    write_jsonl(tmp_path / "t2i.jsonl", [{"output_img": [{"path": f"img/{k % 4}.png"}],
                                          "message": [human(text(3)), gpt(text(1))]} for k in range(12)])
    for name in ("a", "b"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"message": [human(f"{name} {text(2)}"), gpt(text(1))]}
                                                 for _ in range(40)])
    return tmp_path


def dataset_info(root):
    return {fmt.T2I_JSONL: {"gen": {"data_dir": str(root), "jsonl_path": "t2i.jsonl"}},
            fmt.TEXT_ONLY: {"qa_a": {"jsonl_path": "a.jsonl"}, "qa_b": {"jsonl_path": "b.jsonl"}}}


def write_mixture(root, *, mandatory_weight=0, weights=None, **extra):
    spec = {fmt.T2I_JSONL: {"dataset_names": ["gen"], "is_mandatory": True, "weight": mandatory_weight,
                            "image_transform_args": SMALL, "vit_image_transform_args": SMALL_VIT},
            fmt.TEXT_ONLY: {"dataset_names": {"a": ["qa_a"], "b": ["qa_b"]}, "weight": weights or {"a": 1, "b": 3},
                            "num_used_data": {"a": [0], "b": [0]}},
            "dataset_info": dataset_info(root), **extra}
    path = root / "mix.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def data_cfg(mixture, **overrides):
    cfg = tiny.get_config()
    cfg.data.mixture = str(mixture)
    cfg.data.update(dict(max_tokens=160, und_capacity=160, gen_capacity=64, max_ce=128, max_vit_patches=64,
                         max_vae_tokens=64, max_vae_images=8, vae_image_size=(32, 32), num_workers=0,
                         cfg_dropout=dict(text=0.1, vit=0.3, vae=0.3)))
    cfg.data.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def tok():
    model = tiny.get_config().model
    return SentencePieceTokenizer.train([" ".join(WORDS)] * 20, vocab_size=model.llm.vocab_size,
                                        special_ids=dict(model.special_tokens))


def mixture_iterator(path, tok, *, seed=0, **overrides):
    cfg = data_cfg(path, **overrides)
    return MixturePackIterator(Mixture.load(path), StageSchedule.from_config(cfg.curriculum),
                               Planner.from_config(cfg.data, cfg.model, tok), Packer.from_config(cfg.data, cfg.model),
                               seed=seed)


def test_yaml_groups_subgroups_and_dataset_info(mix_dir):
    mixture = Mixture.load(write_mixture(mix_dir))
    assert [(g.name, g.loader, g.weight, g.mandatory) for g in mixture.groups] == [
        (fmt.T2I_JSONL, fmt.T2I_JSONL, 0.0, True), (f"{fmt.TEXT_ONLY}_a", fmt.TEXT_ONLY, 1.0, False),
        (f"{fmt.TEXT_ONLY}_b", fmt.TEXT_ONLY, 3.0, False)]
    gen = mixture.groups[0]
    assert gen.transforms == {"vae": {"stride": 16, "max_size": 32, "min_size": 32},
                              "vit": {"stride": 14, "max_size": 28, "min_size": 28}}
    assert gen.datasets[0].jsonl_path == str(mix_dir / "t2i.jsonl") and len(GroupSource(gen)) == 12
    # dataset_info as a separate JSON file (paths relative to it) gives the same groups.
    (mix_dir / "info").mkdir()
    info = dataset_info(mix_dir)
    for loader in info.values():  # relative paths resolve against the dataset_info file's directory
        for entry in loader.values():
            entry["jsonl_path"] = f"../{entry['jsonl_path']}"
    (mix_dir / "info" / "dataset_info.json").write_text(json.dumps(info))
    spec = yaml.safe_load((mix_dir / "mix.yaml").read_text())
    del spec["dataset_info"]
    (mix_dir / "nosection.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    other = Mixture.load(mix_dir / "nosection.yaml", mix_dir / "info" / "dataset_info.json")
    assert [len(GroupSource(g)) for g in other.groups] == [12, 40, 40]


def test_num_used_data_and_shuffle_lines(mix_dir):
    path = write_mixture(mix_dir)
    spec = yaml.safe_load(path.read_text())
    spec[fmt.TEXT_ONLY]["num_used_data"] = {"qa_a": 5, "qa_b": 0}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    groups = Mixture.load(path).groups
    assert [GroupSource(g)[i][3] for g in groups[1:2] for i in range(5)] == [1, 2, 3, 4, 5]
    assert len(GroupSource(groups[1])) == 5 and len(GroupSource(groups[2])) == 40
    spec[fmt.TEXT_ONLY].update(shuffle_lines=True, shuffle_seed=3)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    lines = [GroupSource(Mixture.load(path).groups[1])[i][3] for i in range(5)]
    assert lines != [1, 2, 3, 4, 5] and len(set(lines)) == 5
    assert lines == [GroupSource(Mixture.load(path).groups[1])[i][3] for i in range(5)]  # seeded


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(NoSuchLoader={"dataset_names": ["x"]}), r"mix.yaml:\d+: NoSuchLoader: unknown loader key"),
    (lambda s: s[fmt.TEXT_ONLY].update(weight={"a": 1}), r"mix.yaml:\d+: .*TextOnly.weight: no weight for subgroup"),
    (lambda s: s[fmt.T2I_JSONL].update(weight=-1), r"mix.yaml:\d+: T2IIterableDataset_Ver1.weight: must be a number"),
    (lambda s: s[fmt.T2I_JSONL].update(shuffle=True), r"T2IIterableDataset_Ver1.shuffle: unknown group key"),
    (lambda s: s[fmt.T2I_JSONL]["image_transform_args"].update(image_mean=[0.4, 0.5, 0.5]),
     r"image_transform_args.image_mean: .* not supported"),
    (lambda s: s[fmt.T2I_JSONL].update(num_used_data=[1, 2]), r"num_used_data: must be a list parallel"),
    (lambda s: s[fmt.T2I_JSONL].update(dataset_names=["unknown_ds"]),
     r"dataset_names.0: dataset 'unknown_ds' has no entry dataset_info"),
    (lambda s: s.pop("dataset_info"), r"dataset_info: missing"),
])
def test_yaml_errors_name_file_line_and_key(mix_dir, edit, message):
    path = write_mixture(mix_dir)
    spec = yaml.safe_load(path.read_text())
    edit(spec)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(UserError, match=message):
        Mixture.load(path)


def test_every_pack_opens_with_the_mandatory_sample_and_groups_follow_weights(mix_dir, tok):
    it = mixture_iterator(write_mixture(mix_dir), tok)
    a, b = f"{fmt.TEXT_ONLY}_a", f"{fmt.TEXT_ONLY}_b"
    packs = 0
    while it.groups_seen[a] + it.groups_seen[b] < 2000:
        next(it)
        packs += 1
        groups = it.last_pack_groups
        assert groups[0] == fmt.T2I_JSONL and groups.count(fmt.T2I_JSONL) == 1  # weight 0: exactly one, first
        assert it.last_pack.record_ids[0].startswith(f"{fmt.T2I_JSONL}/gen/t2i.jsonl:")
        assert it.last_pack.batch.vae_timestep[0] > -np.inf  # the T2I target is in every pack
    n = it.groups_seen[a] + it.groups_seen[b]
    assert packs > 10 and it.groups_seen[fmt.T2I_JSONL] == packs
    assert abs(it.groups_seen[b] - 0.75 * n) <= 3 * math.sqrt(n * 0.75 * 0.25)
    assert it.bad_records.total == 0 and it.packer.stats.rejected == 0


def test_a_mandatory_group_with_weight_is_also_drawn_by_weight(mix_dir, tok):
    it = mixture_iterator(write_mixture(mix_dir, mandatory_weight=4, weights={"a": 1, "b": 1}), tok)
    for _ in range(20):
        next(it)
        assert it.last_pack_groups[0] == fmt.T2I_JSONL
    assert it.groups_seen[fmt.T2I_JSONL] > 20 + 0.5 * sum(it.groups_seen.values()) / 2  # 1 per pack + 2/3 draws


def test_resume_reproduces_the_next_packs(mix_dir, tok):
    path = write_mixture(mix_dir)
    it = mixture_iterator(path, tok, seed=5)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    restored = mixture_iterator(path, tok, seed=5)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for name in ("text_ids", "position_ids", "ce_labels", "vae_timestep", "vae_images"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert restored.step == it.step


def test_oversize_samples_are_counted_with_their_record(mix_dir, tok):
    path = write_mixture(mix_dir)
    spec = yaml.safe_load(path.read_text())
    long = " ".join(WORDS * 30)
    write_jsonl(mix_dir / "a.jsonl", [{"message": [human(long), gpt("normal")]}] * 3)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    it = mixture_iterator(path, tok)
    for _ in range(5):
        next(it)
    assert it.packer.stats.rejected > 0 and it.packer.stats.rejected_by_budget["max_tokens"] > 0
    assert it.packer.stats.rejected_records[0].startswith(f"{fmt.TEXT_ONLY}_a/qa_a/a.jsonl:")
    assert it.stats()["packer"]["rejected"] == it.packer.stats.rejected


def test_build_shards_from_the_yaml(mix_dir, tok, capsys):
    path = write_mixture(mix_dir)
    with open(mix_dir / "a.jsonl", "a") as f:
        f.write('{"message": "not a list"}\n')
    data_dir = mix_dir / "shards"
    assert build.main(["--dataset", "mixture", "--mixture", str(path), "--data-dir", str(data_dir),
                       "--shard-records", "30"]) == 0
    out = capsys.readouterr().out
    name = tfds_builder.MixtureSource(path).name
    assert name.startswith("mixture_mix_") and "missing_field=1" in out
    ds_dir = tfds_builder.dataset_dir(data_dir, name)
    source = tfds_builder.data_source(ds_dir, "train")
    assert len(source) == 12 + 40 + 40
    records = [tfds_builder.decode_example(source[i]) for i in range(len(source))]
    t2i = next(r for r in records if r.meta["loader"] == fmt.T2I_JSONL)
    assert t2i.task == "generation" and t2i.plan.vae_transform == {"stride": 16, "max_size": 32, "min_size": 32}
    cfg = data_cfg(path)
    plan = record_to_plan(t2i, tok, Planner.from_config(cfg.data, cfg.model, tok).transforms, cfg.model,
                          np.random.default_rng(0))
    assert plan.vae_images[0].shape == (32, 32, 3)
    meta = tfds_builder.read_metadata(ds_dir)
    assert meta["bad_records"]["records"] == [{"reason": "missing_field", "id": f"{fmt.TEXT_ONLY}_a/qa_a/a.jsonl:41",
                                               "line": 41}]
    assert build.main(["--dataset", "mixture", "--mixture", str(path), "--data-dir", str(data_dir)]) == 0
    assert "already built" in capsys.readouterr().out


def test_stream_from_the_yaml_through_make_iterator(mix_dir, tmp_path):
    cfg = data_cfg(write_mixture(mix_dir))
    tok = get_tokenizer(cfg.data, cfg.model, workdir=str(tmp_path / "run"))  # trained on the mixture's texts
    it = make_iterator(cfg, tok, shard_index=0, shard_count=1)
    assert isinstance(it, MixturePackIterator)
    for _ in range(3):
        batch = next(it)
        assert batch.text_ids.shape == (cfg.data.max_tokens,) and int(batch.stage) == 0
        assert it.last_pack_groups[0] == fmt.T2I_JSONL
    assert it.step == 3 and set(it.groups_seen) == {fmt.T2I_JSONL, f"{fmt.TEXT_ONLY}_a", f"{fmt.TEXT_ONLY}_b"}
    with pytest.raises(ValueError, match="training data only"):
        make_iterator(cfg, tok, split="val")
    # Two data shards: each reads its own half of every group's lines, and their state round-trips.
    layout = DataShardLayout(batch=2, shards=2, local_shards=(0, 1), rows_by_process={0: (0, 1)})
    sharded = make_sharded_iterator(cfg, tok, layout)
    assert [row for row, _, _ in sharded.next_step()] == [0, 1]
    state = json.loads(json.dumps(sharded.get_state()))
    want = [pack.text_ids for _, pack, _ in sharded.next_step()]
    sharded.set_state(state)
    assert all(np.array_equal(w, pack.text_ids) for w, (_, pack, _) in zip(want, sharded.next_step()))
    ids = [set(sharded.iterators[s].last_pack.record_ids) for s in (0, 1)]
    assert not ids[0] & ids[1]
