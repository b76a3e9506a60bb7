"""Tokenizers behind one interface (docs/packed_sequence.md §4.1): a SentencePiece BPE trained in memory (tiny configs)
and the Qwen2 byte-level BPE read from a `tokenizer.json`.

`encode` never adds BOS/EOS; the packer wraps every text as <|im_start|> + ids + <|im_end|>. The four special
tokens are matched in input text and emitted by `decode`, as Qwen2's tokenizer does.
"""

from __future__ import annotations

import abc
import io
import json
import os
import pathlib
import re

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from unimedvl_jax.errors import UserError, read_json

# Config key (model `special_tokens`) -> token string (docs/packed_sequence.md §4.1 table).
SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}
SP_MODEL_FILE, SP_CONFIG_FILE = "spm.model", "spm_tokenizer.json"
QWEN_FILE = "tokenizer.json"
MIN_SP_PIECES = 288  # 256 byte-fallback pieces + <unk> + a few merges


class Tokenizer(abc.ABC):
    """Text <-> token ids with the four special tokens of docs/packed_sequence.md §4.1 at the model config's ids."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer may produce (every id is below it)."""

    @property
    @abc.abstractmethod
    def special_ids(self) -> dict[str, int]:
        """Config key (bos_token_id, eos_token_id, start_of_image, end_of_image) -> id."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of `ids` (special tokens written out)."""

    @abc.abstractmethod
    def save(self, directory) -> pathlib.Path:
        """Write the files `load_tokenizer(directory)` reads back; returns the directory."""

    @property
    def bos_id(self) -> int:
        return self.special_ids["bos_token_id"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos_token_id"]

    @property
    def start_of_image(self) -> int:
        return self.special_ids["start_of_image"]

    @property
    def end_of_image(self) -> int:
        return self.special_ids["end_of_image"]


def check_compatible(tokenizer: Tokenizer, model_cfg) -> None:
    """Raise if the tokenizer's special ids differ from `model_cfg.special_tokens` or exceed the LLM vocab."""
    errors = []
    for key in SPECIAL_TOKENS:
        if tokenizer.special_ids[key] != int(model_cfg.special_tokens[key]):
            errors.append(f"{key}: tokenizer {tokenizer.special_ids[key]} != config "
                          f"{model_cfg.special_tokens[key]}")
    if tokenizer.vocab_size > model_cfg.llm.vocab_size:
        errors.append(f"tokenizer vocab {tokenizer.vocab_size} > llm.vocab_size {model_cfg.llm.vocab_size}")
    if errors:
        raise ValueError("tokenizer does not match the model config:\n  " + "\n  ".join(errors))


_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS.values()) + ")")


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE over ids [0, N) plus the four special tokens at fixed ids outside that range."""

    def __init__(self, model_proto: bytes, special_ids: dict[str, int], vocab_size: int):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._special = {k: int(special_ids[k]) for k in SPECIAL_TOKENS}
        self._vocab_size = int(vocab_size)
        self._validate()
        self._by_string = {SPECIAL_TOKENS[k]: i for k, i in self._special.items()}
        self._by_id = {i: SPECIAL_TOKENS[k] for k, i in self._special.items()}

    def _validate(self):
        ids = list(self._special.values())
        pieces = self._sp.get_piece_size()
        problems = []
        if len(set(ids)) != len(ids):
            problems.append(f"special ids are not distinct: {self._special}")
        overlap = {k: i for k, i in self._special.items() if 0 <= i < pieces}
        if overlap:
            problems.append(f"special ids {overlap} overlap the {pieces} SentencePiece pieces [0, {pieces})")
        outside = {k: i for k, i in self._special.items() if not 0 <= i < self._vocab_size}
        if outside:
            problems.append(f"special ids {outside} outside the vocabulary [0, {self._vocab_size})")
        if pieces > self._vocab_size:
            problems.append(f"{pieces} pieces exceed the vocabulary size {self._vocab_size}")
        if problems:
            raise ValueError("invalid SentencePiece tokenizer: " + "; ".join(problems))

    @classmethod
    def train(cls, texts, vocab_size: int, special_ids: dict[str, int], *,
              num_pieces: int | None = None) -> "SentencePieceTokenizer":
        """Train a byte-fallback BPE in memory; pieces fill [0, num_pieces) (default: up to the lowest special id).

        vocab_size is the model's vocabulary (llm.vocab_size); every id, special ones included, stays below it.
        """
        special_ids = {k: int(special_ids[k]) for k in SPECIAL_TOKENS}
        if num_pieces is None:
            num_pieces = min(min(special_ids.values()), vocab_size)
        if num_pieces < MIN_SP_PIECES:
            raise ValueError(f"num_pieces={num_pieces} < {MIN_SP_PIECES}: byte_fallback needs 256 byte pieces "
                             f"plus merges (lowest special id {min(special_ids.values())})")
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("cannot train a SentencePiece model on an empty corpus")
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=proto, vocab_size=num_pieces, model_type="bpe",
            byte_fallback=True, hard_vocab_limit=False, character_coverage=1.0, split_digits=True,
            # Exact round trips: no NFKC, keep whitespace runs, no dummy prefix.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1, minloglevel=2)
        return cls(proto.getvalue(), special_ids, vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_pieces(self) -> int:
        """Number of SentencePiece pieces (ids [0, num_pieces))."""
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _SPECIAL_PATTERN.split(text):
            if part in self._by_string:
                ids.append(self._by_string[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids) -> str:
        """Text of ids; special tokens written out, ids that are neither a piece nor special as <|idN|> (a model
        vocabulary is larger than the piece table: an untrained model can emit those rows)."""
        out, run = [], []
        pieces = self._sp.get_piece_size()
        for i in (int(x) for x in ids):
            if i in self._by_id or not 0 <= i < pieces:
                out.append(self._sp.decode(run)), out.append(self._by_id.get(i, f"<|id{i}|>"))
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def save(self, directory) -> pathlib.Path:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SP_MODEL_FILE).write_bytes(self._proto)
        (directory / SP_CONFIG_FILE).write_text(json.dumps(
            {"kind": "sentencepiece", "vocab_size": self._vocab_size, "special_tokens": self._special}, indent=1))
        return directory

    @classmethod
    def load(cls, directory) -> "SentencePieceTokenizer":
        """Read `spm.model` + `spm_tokenizer.json` written by save()."""
        directory = pathlib.Path(directory)
        config = directory / SP_CONFIG_FILE
        meta = read_json(config, what="tokenizer config (JSON)")
        try:
            return cls((directory / SP_MODEL_FILE).read_bytes(), meta["special_tokens"], meta["vocab_size"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a field missing / wrong, a corrupt spm.model
            raise UserError(f"{directory}: not a usable SentencePiece tokenizer ({SP_CONFIG_FILE} + {SP_MODEL_FILE}):"
                            f" {type(e).__name__}: {e}") from e


class QwenTokenizer(Tokenizer):
    """Qwen2 byte-level BPE from a HF `tokenizer.json` (via the `tokenizers` library); no BOS/EOS on encode."""

    def __init__(self, path):
        self._path = pathlib.Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(self._path))
        except Exception as e:  # the tokenizers library raises a bare Exception for a missing or invalid file
            raise UserError(f"{self._path}: not a tokenizers JSON file: {e}") from e
        self._tok.no_padding()
        self._tok.no_truncation()
        special = {}
        for key, token in SPECIAL_TOKENS.items():
            i = self._tok.token_to_id(token)
            if i is None:
                raise ValueError(f"{self._path}: special token {token!r} ({key}) is missing")
            special[key] = int(i)
        self._special = special

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory) -> pathlib.Path:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / QWEN_FILE))
        return directory


def load_tokenizer(path_or_dir) -> Tokenizer:
    """A SentencePiece tokenizer (dir with spm_tokenizer.json) or a Qwen tokenizer (tokenizer.json or its dir)."""
    path = pathlib.Path(os.fspath(path_or_dir))
    if path.is_dir():
        if (path / SP_CONFIG_FILE).is_file():
            return SentencePieceTokenizer.load(path)
        if (path / QWEN_FILE).is_file():
            return QwenTokenizer(path / QWEN_FILE)
        raise FileNotFoundError(f"{path}: no {SP_CONFIG_FILE} (SentencePiece) or {QWEN_FILE} (Qwen) found")
    if path.name == SP_CONFIG_FILE or path.suffix == ".model":
        return SentencePieceTokenizer.load(path.parent)
    if path.suffix == ".json" and path.is_file():
        return QwenTokenizer(path)
    raise FileNotFoundError(f"{path}: not a tokenizer directory or file")
