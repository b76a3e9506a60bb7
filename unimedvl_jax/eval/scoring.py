"""Scoring rules of the evaluation suite: the per-benchmark prompt table, the score of one closed / open /
multiple-choice answer, the LLaVA-Med closed-question rule (reproduced only to count where it disagrees with ours)
and the summary with its breakdowns (docs/evaluation.md "Scoring rules")."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping

from unimedvl_jax.eval.answer_text import YES_NO, answer_tokens, normalize_answer, yes_no_word
from unimedvl_jax.eval.choice_extraction import extract_choice
from unimedvl_jax.eval.items import ANSWER_TYPES, EvalItem

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."
OPTION_LETTER = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
PLAIN_QUESTION = "{question}"  # our own records: the model was trained on the bare question

# benchmark -> answer type -> template; {question} is the question, {options} the "A. text" lines. Override per
# call with build_prompt(item, templates={benchmark: {answer_type: template}}) instead of editing this table.
PROMPTS: dict[str, dict[str, str]] = {
    "vqa-rad": {"closed": SHORT_ANSWER, "open": SHORT_ANSWER},
    "slake": {"closed": SHORT_ANSWER, "open": SHORT_ANSWER},
    "pathvqa": {"closed": SHORT_ANSWER, "open": SHORT_ANSWER},
    "omnimedvqa": {"choice": OPTION_LETTER},
    "gmai": {"choice": OPTION_LETTER},
    "manifest": {"closed": PLAIN_QUESTION, "open": PLAIN_QUESTION},
}
MISSING = "(missing)"  # category value of items that lack a category column others have
_EXAMPLE_IDS = 20


def format_options(options) -> str:
    """The option lines of a multiple-choice prompt: "A. text" per option, newline-separated."""
    return "\n".join(f"{letter}. {text}" for letter, text in options)


def build_prompt(item: EvalItem, templates: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The prompt of one item: templates[benchmark][answer_type] if given there, else PROMPTS'."""
    template = (templates or {}).get(item.benchmark, {}).get(item.answer_type) \
        or PROMPTS.get(item.benchmark, {}).get(item.answer_type)
    if template is None:
        raise KeyError(f"no prompt template for benchmark {item.benchmark!r} answer type {item.answer_type!r} "
                       f"(item {item.item_id!r}); PROMPTS has {sorted(PROMPTS)}, pass templates={{benchmark: "
                       f"{{answer_type: template}}}}")
    if item.answer_type == "choice" and "{options}" not in template:
        raise ValueError(f"prompt template {template!r} for {item.benchmark}/choice has no {{options}} field: the "
                         f"options of item {item.item_id!r} would not be shown")
    try:
        return template.format(question=item.question, options=format_options(item.options))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"prompt template {template!r} for {item.benchmark}/{item.answer_type}: {e!r}; only "
                         f"{{question}} and {{options}} are filled (write literal braces as {{{{ }}}})") from e


@dataclasses.dataclass(frozen=True)
class Score:
    """The score of one answer.

    correct: 1.0 / 0.0 (open items: the exact match). exact_match: normalised prediction == normalised gold (closed
    and open; for yes/no items it can be False while correct is 1, e.g. "Yes, there is."), the letter is right
    (choice). recall: token recall of open items, else None. parsed: what was read from the prediction (yes/no word,
    normalised text, option letter) or None. unparseable: nothing could be read (scored wrong). rule: which rule
    decided ("closed:yes_no", "closed:exact", "open:exact", "choice:<extraction rule>")."""

    correct: float
    exact_match: bool
    recall: float | None
    parsed: str | None
    unparseable: bool
    rule: str


def token_recall(gold: str, prediction: str) -> float:
    """Share of the gold answer's normalised tokens found among the prediction's, each prediction token used at
    most as often as it occurs (ROUGE-1 recall); 0.0 for an empty prediction."""
    gold_tokens, pred_counts = answer_tokens(gold), collections.Counter(answer_tokens(prediction))
    if not gold_tokens:
        raise ValueError(f"gold answer {gold!r} normalises to nothing; token recall is undefined")
    hits = sum(min(n, pred_counts[t]) for t, n in collections.Counter(gold_tokens).items())
    return hits / len(gold_tokens)


def score(item: EvalItem, prediction: str) -> Score:
    """Score one prediction by the item's answer type (docs/evaluation.md "Scoring rules")."""
    if not isinstance(prediction, str):
        raise TypeError(f"{item.benchmark} item {item.item_id!r}: prediction must be a string, got "
                        f"{type(prediction).__name__}")
    if item.answer_type == "choice":
        letter, rule = extract_choice(prediction, item.options)
        ok = letter == item.answer
        return Score(float(ok), ok, None, letter, letter is None, f"choice:{rule}")
    gold, pred = normalize_answer(item.answer), normalize_answer(prediction)
    if not gold:
        raise ValueError(f"{item.benchmark} item {item.item_id!r}: gold answer {item.answer!r} normalises to nothing")
    if item.answer_type == "closed" and gold in YES_NO:
        word = yes_no_word(prediction)
        return Score(float(word == gold), pred == gold, None, word, word is None, "closed:yes_no")
    if item.answer_type == "closed":
        return Score(float(pred == gold), pred == gold, None, pred or None, not pred, "closed:exact")
    return Score(float(pred == gold), pred == gold, token_recall(item.answer, prediction), pred or None, not pred,
                 "open:exact")


def llava_med_closed_match(gold: str, prediction: str) -> bool:
    """LLaVA-Med's closed-question hit, reproduced only to count where it disagrees with score(); never use it to
    score. On normalised strings: hit = ('yes' in prediction or 'no' in prediction) and gold in prediction, all
    SUBSTRING tests. Its known bugs: "no" is found inside "nodule", "not", "know", "normal", "none" and "yes" inside
    "eyes" (so gold "no" matches "a nodule is seen"); a correct non-yes/no answer ("left" for gold "left") is a miss
    unless the prediction happens to contain "yes" / "no" somewhere ("left nodule" is then a hit); a prediction that
    contains both ("yes or no") matches either gold; and a wrong answer containing yes / no leaves the denominator
    (see llava_med_closed_counted)."""
    g, p = normalize_answer(gold), normalize_answer(prediction)
    return ("yes" in p or "no" in p) and g in p


def llava_med_closed_counted(gold: str, prediction: str) -> bool:
    """Whether LLaVA-Med's closed accuracy counts this item at all: a prediction containing 'yes' or 'no' (as a
    substring) without containing the gold answer appends nothing, so that wrong answer leaves the denominator."""
    g, p = normalize_answer(gold), normalize_answer(prediction)
    return not (("yes" in p or "no" in p) and g not in p)


def score_all(items: Iterable[EvalItem], predictions: Mapping[str, str]) -> dict[str, Score | None]:
    """item_id -> Score, None where the prediction is missing; duplicate item ids raise."""
    out: dict[str, Score | None] = {}
    for item in items:
        if item.item_id in out:
            raise ValueError(f"{item.benchmark}: duplicate item id {item.item_id!r} in the items to score")
        out[item.item_id] = score(item, predictions[item.item_id]) if item.item_id in predictions else None
    return out


def _mean(values: list[float]) -> float | None:
    """Mean, or None for no values (JSON-friendly)."""
    return math.fsum(values) / len(values) if values else None


def _closed_summary(items: list[EvalItem], scores: dict, predictions: Mapping[str, str]) -> dict:
    """Closed accuracy, yes/no count, unparseable answers and the LLaVA-Med rule's view of the same answers."""
    answered = [i for i in items if scores[i.item_id] is not None]
    hits = [llava_med_closed_match(i.answer, predictions[i.item_id]) for i in answered]
    counted = [llava_med_closed_counted(i.answer, predictions[i.item_id]) for i in answered]
    differs = [i.item_id for i, hit in zip(answered, hits) if hit != bool(scores[i.item_id].correct)]
    return {
        "n": len(items),
        "accuracy": _mean([s.correct if (s := scores[i.item_id]) else 0.0 for i in items]),
        "yes_no": sum(normalize_answer(i.answer) in YES_NO for i in items),
        "unparseable": sum(bool(s and s.unparseable) for s in (scores[i.item_id] for i in items)),
        "missing": len(items) - len(answered),
        "llava_med": {
            "accuracy": (sum(h for h, c in zip(hits, counted) if c) / sum(counted)) if any(counted) else None,
            "counted": sum(counted),
            "dropped": len(answered) - sum(counted),
            "differs": len(differs),
            "differs_ids": differs[:_EXAMPLE_IDS],
        },
    }


def _open_summary(items: list[EvalItem], scores: dict) -> dict:
    """Open exact match and mean token recall (a missing prediction counts 0 for both)."""
    return {
        "n": len(items),
        "exact_match": _mean([s.correct if (s := scores[i.item_id]) else 0.0 for i in items]),
        "mean_recall": _mean([s.recall if (s := scores[i.item_id]) else 0.0 for i in items]),
        "unparseable": sum(bool(s and s.unparseable) for s in (scores[i.item_id] for i in items)),
        "missing": sum(scores[i.item_id] is None for i in items),
    }


def _choice_summary(items: list[EvalItem], scores: dict) -> dict:
    """Multiple-choice accuracy, unparseable answers and how the letters were read."""
    rules = collections.Counter(s.rule.split(":", 1)[1] for i in items if (s := scores[i.item_id]))
    return {
        "n": len(items),
        "accuracy": _mean([s.correct if (s := scores[i.item_id]) else 0.0 for i in items]),
        "unparseable": sum(bool(s and s.unparseable) for s in (scores[i.item_id] for i in items)),
        "missing": sum(scores[i.item_id] is None for i in items),
        "by_rule": dict(sorted(rules.items())),
    }


def summarize(items: Iterable[EvalItem], predictions: Mapping[str, str]) -> dict:
    """Overall accuracy, per answer type and per category column (value -> n, accuracy); missing predictions count
    as wrong and are counted, predictions for unknown ids are counted (docs/evaluation.md "Scoring rules")."""
    items = list(items)
    scores = score_all(items, predictions)
    correct = {k: (s.correct if s else 0.0) for k, s in scores.items()}
    missing = [i.item_id for i in items if scores[i.item_id] is None]
    extra = sorted(set(predictions) - set(scores))
    by_type = {t: [i for i in items if i.answer_type == t] for t in ANSWER_TYPES}
    summaries = {"closed": lambda its: _closed_summary(its, scores, predictions),
                 "open": lambda its: _open_summary(its, scores), "choice": lambda its: _choice_summary(its, scores)}
    columns = sorted({c for i in items for c in i.categories})
    by_category = {}
    for column in columns:
        groups = collections.defaultdict(list)
        for i in items:
            groups[str(i.categories.get(column, MISSING))].append(correct[i.item_id])
        by_category[column] = {v: {"n": len(c), "accuracy": _mean(c)} for v, c in sorted(groups.items())}
    return {
        "n": len(items),
        "accuracy": _mean(list(correct.values())),
        "missing_predictions": len(missing),
        "missing_ids": missing[:_EXAMPLE_IDS],
        "extra_predictions": len(extra),
        "extra_ids": extra[:_EXAMPLE_IDS],
        "by_answer_type": {t: summaries[t](its) for t, its in by_type.items() if its},
        "by_category": by_category,
    }
