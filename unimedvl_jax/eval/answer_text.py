"""Answer normalisation for VQA scoring: the usual VQA steps (case, punctuation, articles, number words,
whitespace), applied identically to gold answers and predictions (docs/evaluation.md "Scoring rules")."""

from __future__ import annotations

import re
import unicodedata

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
YES_NO = frozenset({"yes", "no"})

_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_DIGIT_GROUP_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# any non-word character (and '_') becomes a space, except a '.' between two digits (a decimal point)
_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")
# CJK ideographs (SLAKE's Chinese answers have no spaces): one token per character
_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


def normalize_answer(text: str) -> str:
    """Normalised answer text, rule by rule:

    1. Unicode NFKC (full-width '？' -> '?', ligatures) and lower case: "MRI" -> "mri".
    2. Apostrophes are deleted, not spaced: "Crohn's" -> "crohns", "don't" -> "dont".
    3. Thousands separators are deleted: "1,000" -> "1000".
    4. Every other punctuation character (and '_') becomes a space, except a decimal point between digits:
       "T2-weighted." -> "t2 weighted", "2.5 cm" stays "2.5 cm".
    5. CJK ideographs are split into one token each: "肝脏" -> "肝 脏".
    6. Articles a / an / the are dropped as whole words: "the left lung" -> "left lung" ("theta" stays).
    7. Number words zero..twenty become digits as whole words: "two" -> "2", "Twenty" -> "20".
    8. Whitespace is collapsed to single spaces and stripped.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a string, got {type(text).__name__}: {text!r}")
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHES.sub("", text)
    text = _DIGIT_GROUP_COMMA.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    text = _CJK.sub(r" \1 ", text)
    return " ".join(NUMBER_WORDS.get(t, t) for t in text.split() if t not in ARTICLES)


def answer_tokens(text: str) -> list[str]:
    """Tokens of the normalised answer (whitespace split of normalize_answer)."""
    return normalize_answer(text).split()


def yes_no_word(text: str) -> str | None:
    """The first whole word 'yes' or 'no' of the normalised text, or None: "Yes, there is." -> "yes",
    "There is no fracture." -> "no", "nodule" / "not sure" / "unknown" -> None."""
    return next((t for t in answer_tokens(text) if t in YES_NO), None)
