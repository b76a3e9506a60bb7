"""Which option a free-text answer to a multiple-choice question picks: option-letter extraction as VLMEvalKit /
MMMU do it, falling back to option-text matching, unparseable otherwise (docs/evaluation.md "Scoring rules")."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from unimedvl_jax.eval.answer_text import answer_tokens

# Rule names in the order they are tried (Score.rule is "choice:<name>").
CHOICE_RULES = ("letter_only", "option_text_exact", "answer_phrase", "leading_letter", "bracketed", "letter_token",
                "option_text")

_LETTER_ONLY = re.compile(r"^[\s(\[{*\"'`]*([A-Za-z])[\s)\]}.:,;!*\"'`]*$")
_ANSWER_PHRASE = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is|would be|should be|will be|=|:)\s*:?\s*(?:option\s+|choice\s+)?"
    r"[(\[]?([A-Za-z])([)\]]?)(?![\w])", re.IGNORECASE)
_LEADING_BRACKETED = re.compile(r"^\s*[*\"'`]*[(\[]([A-Za-z])[)\]]")
_LEADING_LETTER = re.compile(r"^\s*[*\"'`]*(?:([A-Z])(?:[.):]|\s*$)|([a-z])[.)])")
_BRACKETED = re.compile(r"[(\[]([A-Za-z])[)\]]")
_NON_ALNUM = re.compile(r"[^0-9A-Za-z]+")
# A lone upper-case A or I in a longer answer is more likely an article / pronoun than an option letter
# (VLMEvalKit's can_infer_option rejects a lone 'A' in answers of more than three words).
_WORD_LETTERS = frozenset("AI")


def extract_choice(prediction: str, options: Sequence[tuple[str, str]]) -> tuple[str | None, str]:
    """(option letter, rule name) picked by `prediction` among `options` ((letter, text) pairs), or
    (None, 'unparseable'). Rules, first match wins:

    letter_only        the whole answer is one letter, maybe bracketed / punctuated: "B", "(b)", "B.", "**C**".
    option_text_exact  the answer is the text of exactly one option, up to case, spacing and surrounding
                       punctuation ("C. difficile colitis" is that option's text, not letter C).
    answer_phrase      the last "answer is X" / "Answer: X" / "correct option is (X)" / "choice: X"; a lower-case
                       letter only when followed by ) . : or the end ("the answer is a mass" is no letter).
    leading_letter     the answer starts with "(C)", "[c]", "C.", "C)", "C:" or "c)" / "c." ("A lesion" does not).
    bracketed          exactly one distinct option letter appears bracketed: "... so (D) ...".
    letter_token       exactly one distinct upper-case option letter appears as a word; as in VLMEvalKit, a lone A
                       (or I) in an answer of more than three words is taken for an article / pronoun, not a
                       letter (so "A nodule" reads as A, "A nodule is seen here" as nothing).
    option_text        the normalised text of exactly one option appears in the normalised answer as whole words,
                       after dropping options whose text is part of another matching option's text ("no" inside
                       "no, it's normal").
    A letter that is not one of the options never counts."""
    letters = {letter.upper(): letter for letter, _ in options}
    text = prediction.strip()
    if not text:
        return None, "unparseable"

    def known(letter: str | None) -> str | None:
        return letters.get(letter.upper()) if letter else None

    m = _LETTER_ONLY.match(text)
    if m and known(m.group(1)):
        return known(m.group(1)), "letter_only"
    exact = [letter for letter, option in options if _light(option) == _light(text)]
    if len(exact) == 1:
        return exact[0], "option_text_exact"
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        letter, closing = m.groups()
        after = text[m.end():m.end() + 1]
        if letter.islower() and not (closing or after in ("", ".", ":")):
            continue
        if known(letter):
            return known(letter), "answer_phrase"
    m = _LEADING_BRACKETED.match(text) or _LEADING_LETTER.match(text)
    if m:
        letter = next(g for g in m.groups() if g)
        if known(letter):
            return known(letter), "leading_letter"
    bracketed = {known(x) for x in _BRACKETED.findall(text)} - {None}
    if len(bracketed) == 1:
        return bracketed.pop(), "bracketed"
    words = [w for w in _NON_ALNUM.split(text) if w]
    tokens = {known(w) for w in words if len(w) == 1 and w.isupper()} - {None}
    if len(tokens) == 1 and not (len(words) > 3 and next(iter(tokens)).upper() in _WORD_LETTERS):
        return tokens.pop(), "letter_token"
    found = _option_text_matches(answer_tokens(text), options)
    if len(found) == 1:
        return found[0], "option_text"
    return None, "unparseable"


def _light(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: the comparison of option_text_exact (articles and
    letters stay, so "(A) Kidney" is not the text "Kidney")."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split()).strip(" .,;:!?")


def _option_text_matches(tokens: list[str], options: Sequence[tuple[str, str]]) -> list[str]:
    """Letters of the options whose normalised text occurs in `tokens` as a contiguous run of whole words, minus
    those whose text is a run inside another matching option's text."""
    matched = [(letter, option_tokens) for letter, option in options
               if (option_tokens := answer_tokens(option)) and _contains(tokens, option_tokens)]
    return [letter for letter, t in matched
            if not any(other != t and _contains(other, t) for _, other in matched)]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    """Whether `needle` is a contiguous run of `haystack`."""
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))
