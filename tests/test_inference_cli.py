"""unimedvl-vqa / -generate / -edit end to end on a tiny random model saved as a training workdir and as an
official-layout export: PNG / DICOM / NIfTI inputs, PNG outputs, seeds, and clear errors."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unimedvl_jax import inference_cli
from unimedvl_jax.testing import small_model_config

CORPUS = ["What imaging modality is this?", "This is a CT scan of the chest.", "An axial brain MRI slice.",
          "Increase the resolution of this image by 2x.", "Generate a chest radiograph."] * 20
SAMPLER = ["--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """<tmp>/run: final/ (params checkpoint), tokenizer/ (SentencePiece), config.json (the run's data section)."""
    from unimedvl_jax.data_config import data_config
    from unimedvl_jax.interop.params_checkpoint import save_params_checkpoint
    from unimedvl_jax.models.unimedvl import UniMedVL
    from unimedvl_jax.tokenizers import SentencePieceTokenizer

    run = tmp_path_factory.mktemp("cli") / "run"
    cfg = small_model_config()
    cfg.llm.vocab_size = 1024
    cfg.special_tokens = ml_collections.ConfigDict(dict(bos_token_id=1000, eos_token_id=1001, start_of_image=1002,
                                                        end_of_image=1003))
    with nnx.use_eager_sharding(False):
        model = UniMedVL(cfg, rngs=nnx.Rngs(0))
        save_params_checkpoint(run / "final", model, cfg, ema_model=model)
    SentencePieceTokenizer.train(CORPUS, vocab_size=1024, special_ids=dict(cfg.special_tokens)).save(run / "tokenizer")
    data = data_config(vit_transform=dict(max_size=56, min_size=28, stride=14),
                       vae_transform=dict(max_size=32, min_size=16, stride=4), vae_image_size=(16, 24))
    (run / "config.json").write_text(json.dumps({"data": data.to_dict()}))
    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A PNG, pydicom's CT_small.dcm and nibabel's anatomical.nii."""
    import nibabel
    from pydicom.data import get_testdata_file

    base = tmp_path_factory.mktemp("inputs")
    png = base / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)).save(png)
    nii = pathlib.Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    return {"png": png, "dcm": pathlib.Path(get_testdata_file("CT_small.dcm")), "nii": nii}


def test_vqa_answers_like_the_library_for_png_dicom_nifti(workdir, inputs, capsys):
    from unimedvl_jax.eval.vqa import answer_image
    from unimedvl_jax.inference.loading import load_for_inference, read_input_image

    loaded = load_for_inference(workdir)
    for kind, path in inputs.items():
        assert inference_cli.vqa_main(["--checkpoint", str(workdir), "--image", str(path), "--question",
                                       "What imaging modality is this?", "--max-new-tokens", "6"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()[-1]
        want = answer_image(loaded.model, loaded.tokenizer, loaded.vit_transform, read_input_image(path),
                            "What imaging modality is this?", max_new_tokens=6)
        assert printed == want.strip(), kind


def test_generate_writes_sized_pngs_and_seeds_matter(workdir, tmp_path):
    out = tmp_path / "gen.png"
    assert inference_cli.generate_main(["--checkpoint", str(workdir), "--prompt", "Generate a chest radiograph.",
                                        "--out", str(out), "--num-images", "2", *SAMPLER]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"gen_{i}.png")) for i in (0, 1))
    assert a.shape == b.shape == (16, 24, 3)        # the run's vae_image_size
    assert not np.array_equal(a, b)                 # seeds 3 and 4
    assert inference_cli.generate_main(["--checkpoint", str(workdir), "--prompt", "Generate a chest radiograph.",
                                        "--out", str(out), "--size", "16,16", *SAMPLER]) == 0
    c = np.asarray(Image.open(out))
    assert c.shape == (16, 16, 3)
    inference_cli.generate_main(["--checkpoint", str(workdir), "--prompt", "Generate a chest radiograph.",
                                 "--out", str(tmp_path / "again.png"), "--size", "16,16", *SAMPLER])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), c)  # same seed, same image


def test_edit_takes_the_input_size_rule_and_official_export_matches(workdir, inputs, tmp_path):
    from unimedvl_jax.inference.loading import load_for_inference
    from unimedvl_jax.interop.checkpoint_export import export_official

    args = ["--image", str(inputs["png"]), "--instruction", "Increase the resolution of this image by 2x.",
            *SAMPLER]
    assert inference_cli.edit_main(["--checkpoint", str(workdir), "--out", str(tmp_path / "e.png"), *args]) == 0
    edited = np.asarray(Image.open(tmp_path / "e.png"))
    assert edited.shape == (24, 32, 3)              # 40x52 under the run's VAE rule (max 32, stride 4)
    # the same model exported to the official layout (fp32) answers identically through the import path
    loaded = load_for_inference(workdir)
    official = tmp_path / "official"
    export_official(loaded.model, loaded.cfg, official, dtype="float32", tokenizer_dir=workdir / "tokenizer")
    again = load_for_inference(official)
    assert again.source.startswith("official directory")
    import jax

    want, got = (jax.tree.leaves(nnx.state(m.model, nnx.Param)) for m in (loaded, again))
    assert len(want) == len(got)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.cfg.vae.norm_groups == loaded.cfg.vae.norm_groups == 4   # carried by bagel_config.json


def test_clear_errors(workdir, inputs, tmp_path, capsys):
    def error_line(main, argv) -> str:  # bad input: one `prog: error: ...` line, exit status 2
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        return line

    png = str(inputs["png"])
    assert "not a training workdir" in error_line(
        inference_cli.vqa_main, ["--checkpoint", str(tmp_path), "--image", png, "--question", "q"])
    (tmp_path / "checkpoints").mkdir()
    assert "training not finished" in error_line(
        inference_cli.vqa_main, ["--checkpoint", str(tmp_path), "--image", png, "--question", "q"])
    assert error_line(inference_cli.vqa_main, ["--checkpoint", str(workdir), "--image", str(tmp_path / "missing.png"),
                                               "--question", "q"]).endswith("missing.png: no such file")
    with pytest.raises(SystemExit):
        inference_cli.generate_main(["--checkpoint", str(workdir), "--prompt", "p", "--out", "o.png",
                                     "--num-images", "0"])
    with pytest.raises(SystemExit):  # --size takes H,W
        inference_cli.generate_main(["--checkpoint", str(workdir), "--prompt", "p", "--out", "o.png", "--size", "16"])
