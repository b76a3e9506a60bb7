"""Scoring rules on hand-written cases, the known pitfalls included ("no" inside "nodule", "Yes." vs "yes", "two"
vs "2", "(C) liver", option-text fallback, unparseable answers), the prompt table and summarize() on a small
hand-checked set (docs/evaluation.md "Scoring rules")."""

import pytest

from unimedvl_jax.eval.answer_text import normalize_answer, yes_no_word
from unimedvl_jax.eval.choice_extraction import CHOICE_RULES, extract_choice
from unimedvl_jax.eval.items import EvalItem
from unimedvl_jax.eval.scoring import (
    PROMPTS,
    Score,
    build_prompt,
    llava_med_closed_counted,
    llava_med_closed_match,
    score,
    summarize,
    token_recall,
)

IMG = (b"\x89PNG",)
OPTIONS = (("A", "Liver"), ("B", "Kidney"), ("C", "Spleen"), ("D", "No, It's normal."))
CDIFF = (("A", "Rotavirus"), ("B", "C. difficile"), ("C", "Norovirus"))


def closed(gold, item_id="c", **categories):
    return EvalItem("vqa-rad", item_id, IMG, "Is there a mass?", gold, "closed", categories=categories)


def open_(gold, item_id="o", **categories):
    return EvalItem("slake", item_id, IMG, "Where is the lesion?", gold, "open", categories=categories)


def choice(gold, item_id="m", options=OPTIONS, **categories):
    return EvalItem("gmai", item_id, IMG, "Which organ is shown?", gold, "choice", options, categories)


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"), ("  MRI. ", "mri"),                                   # case, punctuation, whitespace
    ("Crohn's disease", "crohns disease"), ("don\u2019t", "dont"),         # apostrophes deleted
    ("1,000 mL", "1000 ml"), ("2.5 cm", "2.5 cm"), ("end.", "end"),        # separators, decimal points
    ("T2-weighted / FLAIR", "t2 weighted flair"), ("x_ray", "x ray"),      # other punctuation -> space
    ("The left lung", "left lung"), ("an MRI", "mri"), ("theta wave", "theta wave"),   # articles, whole words
    ("two", "2"), ("Twenty lesions", "20 lesions"), ("someone", "someone"),  # number words, whole words
    ("肝脏？", "肝 脏"), ("ＭＲＩ", "mri"),                                   # CJK split, NFKC
    ("The", ""), ("?!", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_yes_no_word_is_a_whole_word():
    assert yes_no_word("Yes, there is a fracture.") == "yes"
    assert yes_no_word("There is no fracture.") == "no"
    assert yes_no_word("No. Yes.") == "no"  # the first one decides
    for text in ("A nodule is seen.", "not sure", "unknown", "normal", "none", "eyes", "I cannot tell", ""):
        assert yes_no_word(text) is None, text


def test_closed_yes_no():
    assert score(closed("yes"), "Yes.") == Score(1.0, True, None, "yes", False, "closed:yes_no")
    assert score(closed("Yes"), "yes, there is a mass") == Score(1.0, False, None, "yes", False, "closed:yes_no")
    assert score(closed("no"), "There is no mass.").correct == 1.0
    # the pitfalls of substring rules: "no" inside "nodule", "not", "unknown" is no answer at all
    assert score(closed("no"), "A nodule is seen.") == Score(0.0, False, None, None, True, "closed:yes_no")
    assert score(closed("no"), "not sure").unparseable and score(closed("yes"), "unknown").unparseable
    assert score(closed("yes"), "no").correct == 0.0 and not score(closed("yes"), "no").unparseable


def test_closed_other_answers_exact_after_normalisation():
    assert score(closed("left"), "Left.") == Score(1.0, True, None, "left", False, "closed:exact")
    assert score(closed("left"), "left side").correct == 0.0
    assert score(closed("2"), "two").correct == 1.0
    assert score(closed("left"), " ... ") == Score(0.0, False, None, None, True, "closed:exact")


def test_open_exact_match_and_token_recall():
    assert score(open_("two"), "2") == Score(1.0, True, 1.0, "2", False, "open:exact")
    s = score(open_("right lower lobe"), "The lower lobe")
    assert (s.correct, s.exact_match, s.parsed) == (0.0, False, "lower lobe") and s.recall == pytest.approx(2 / 3)
    assert token_recall("lobe lobe", "lobe") == 0.5          # a prediction token is used at most once
    assert token_recall("left lung", "lung left, left") == 1.0
    assert token_recall("liver", "") == 0.0
    assert score(open_("liver"), "").unparseable
    with pytest.raises(ValueError, match="normalises to nothing"):
        score(EvalItem("slake", "x", IMG, "q", "the", "open"), "liver")


@pytest.mark.parametrize("prediction, letter, rule", [
    ("B", "B", "letter_only"), ("(b)", "B", "letter_only"), ("C.", "C", "letter_only"), ("**D**", "D", "letter_only"),
    ("spleen", "C", "option_text_exact"), ("No, it's normal", "D", "option_text_exact"),
    ("The answer is C.", "C", "answer_phrase"), ("Answer: b", "B", "answer_phrase"),
    ("The correct option is (D) because ...", "D", "answer_phrase"),
    ("A or B? The answer is B", "B", "answer_phrase"),           # the last stated answer
    ("(C) liver", "C", "leading_letter"),                        # the letter, not the text, decides
    ("C. Spleen", "C", "leading_letter"), ("c) spleen", "C", "leading_letter"), ("[A] Liver", "A", "leading_letter"),
    ("It must be (B), the kidney", "B", "bracketed"),
    ("Option B is correct", "B", "letter_token"), ("I think it is C", "C", "letter_token"),
    ("A nodule", "A", "letter_token"),                           # VLMEvalKit's reading of a short answer
    ("(A) Kidney", "A", "leading_letter"),                       # the letter, not the article-dropped text
    ("C. difficile", "B", "option_text_exact"),                  # option B, not letter C
    ("the answer is a mass in the kidney", "B", "option_text"),  # 'a' is an article, kidney is the text
    ("A lesion in the kidney", "B", "option_text"),              # leading 'A' of a sentence is no letter
    ("It shows the spleen.", "C", "option_text"),
    ("no, it's normal tissue", "D", "option_text"),              # 'no' alone is no option; the longer text wins
])
def test_choice_extraction(prediction, letter, rule):
    assert extract_choice(prediction, CDIFF if "difficile" in prediction else OPTIONS) == (letter, rule)
    assert rule in CHOICE_RULES


@pytest.mark.parametrize("prediction", [
    "", "E", "The answer is E", "I don't know", "kidney or spleen", "either (A) or (B)", "A nodule is seen here",
    "Unclear.",
])
def test_choice_unparseable(prediction):
    assert extract_choice(prediction, OPTIONS) == (None, "unparseable")
    s = score(choice("C"), prediction)
    assert s == Score(0.0, False, None, None, True, "choice:unparseable")


def test_choice_score():
    assert score(choice("C"), "(C) liver") == Score(1.0, True, None, "C", False, "choice:leading_letter")
    assert score(choice("A"), "(C) liver").correct == 0.0
    assert score(choice("B"), "The kidney.") == Score(1.0, True, None, "B", False, "choice:option_text")
    gaps = (("A", "CT"), ("C", "MRI"))   # letters as the benchmark gives them, gaps included
    assert extract_choice("B", gaps) == (None, "unparseable") and extract_choice("c", gaps) == ("C", "letter_only")


def test_llava_med_rule_and_its_bugs():
    assert llava_med_closed_match("no", "A nodule is seen.")          # "no" inside "nodule"
    assert llava_med_closed_match("yes", "yes or no") and llava_med_closed_match("no", "yes or no")
    assert not llava_med_closed_match("left", "left")                 # right answer without yes / no: a miss
    assert llava_med_closed_match("left", "left nodule")              # ... unless "no" hides in another word
    assert not llava_med_closed_counted("yes", "no")                  # a wrong yes / no leaves the denominator
    assert llava_med_closed_counted("left", "right") and llava_med_closed_counted("yes", "Yes.")
    # ours has none of these
    assert score(closed("no"), "A nodule is seen.").correct == 0.0
    assert score(closed("left"), "left").correct == 1.0


def test_prompts():
    item = closed("yes")
    assert build_prompt(item) == "Is there a mass?\nAnswer the question using a single word or phrase."
    assert build_prompt(choice("B")) == ("Which organ is shown?\nA. Liver\nB. Kidney\nC. Spleen\nD. No, It's normal.\n"
                                         "Answer with the option's letter from the given choices directly.")
    assert build_prompt(EvalItem("manifest", "r#0", IMG, "What imaging modality is this?", "MRI", "closed")) == \
        "What imaging modality is this?"
    assert build_prompt(item, {"vqa-rad": {"closed": "Q: {question} A:"}}) == "Q: Is there a mass? A:"
    assert build_prompt(open_("x"), {"vqa-rad": {"closed": "Q: {question}"}}) == \
        "Where is the lesion?\nAnswer the question using a single word or phrase."   # other entries unchanged
    assert set(PROMPTS) == {"vqa-rad", "slake", "pathvqa", "omnimedvqa", "gmai", "manifest"}
    with pytest.raises(KeyError, match="no prompt template for benchmark 'mmmu'"):
        build_prompt(EvalItem("mmmu", "1", IMG, "q", "a", "open"))
    with pytest.raises(ValueError, match="has no {options} field"):
        build_prompt(choice("B"), {"gmai": {"choice": "{question}"}})
    with pytest.raises(ValueError, match=r"only {question} and {options} are filled"):
        build_prompt(item, {"vqa-rad": {"closed": "{question} {answer}"}})


def test_summarize_hand_checked():
    items = [
        closed("yes", "c1", modality="CT"), closed("no", "c2", modality="CT"), closed("left", "c3", modality="MRI"),
        closed("yes", "c4"), closed("no", "c5"),
        open_("right lower lobe", "o1", modality="CT"), open_("two", "o2"),
        choice("B", "m1", modality="MRI"), choice("C", "m2"), choice("A", "m3"),
    ]
    predictions = {"c1": "Yes.", "c2": "There is a nodule.", "c3": "left", "c4": "no",   # c5 missing
                   "o1": "lower lobe", "o2": "2", "m1": "(B) kidney", "m2": "I don't know", "m3": "spleen",
                   "zz": "an answer to no question"}
    s = summarize(items, predictions)
    assert s["n"] == 10 and s["accuracy"] == pytest.approx(0.4)   # c1 c3 o2 m1
    assert (s["missing_predictions"], s["missing_ids"], s["extra_predictions"], s["extra_ids"]) == (1, ["c5"], 1,
                                                                                                    ["zz"])
    assert s["by_answer_type"]["closed"] == {
        "n": 5, "accuracy": pytest.approx(0.4), "yes_no": 4, "unparseable": 1, "missing": 1,
        # LLaVA-Med: c1 hit, c2 hit ("no" in "nodule"), c3 miss (no yes/no), c4 dropped -> 2 / 3
        "llava_med": {"accuracy": pytest.approx(2 / 3), "counted": 3, "dropped": 1, "differs": 2,
                      "differs_ids": ["c2", "c3"]}}
    assert s["by_answer_type"]["open"] == {"n": 2, "exact_match": 0.5, "mean_recall": pytest.approx(5 / 6),
                                           "unparseable": 0, "missing": 0}
    assert s["by_answer_type"]["choice"] == {
        "n": 3, "accuracy": pytest.approx(1 / 3), "unparseable": 1, "missing": 0,
        "by_rule": {"leading_letter": 1, "option_text_exact": 1, "unparseable": 1}}
    assert s["by_category"] == {"modality": {
        "(missing)": {"n": 5, "accuracy": pytest.approx(0.2)},   # c4 c5 o2 m2 m3: only o2 right
        "CT": {"n": 3, "accuracy": pytest.approx(1 / 3)},        # c1 c2 o1
        "MRI": {"n": 2, "accuracy": 1.0}}}                       # c3 m1


def test_summarize_edge_cases():
    assert summarize([], {})["accuracy"] is None
    only_missing = summarize([choice("A", "m")], {})
    assert only_missing["accuracy"] == 0.0 and only_missing["by_answer_type"]["choice"]["missing"] == 1
    assert summarize([closed("yes", "c")], {})["by_answer_type"]["closed"]["llava_med"]["accuracy"] is None
    with pytest.raises(ValueError, match="duplicate item id 'c'"):
        summarize([closed("yes", "c"), closed("no", "c")], {})
    with pytest.raises(TypeError, match="prediction must be a string"):
        summarize([closed("yes", "c")], {"c": None})
