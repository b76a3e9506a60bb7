"""Wording of generated medical tasks: VQA questions answered from ground-truth facts, captions, text->image prompts
and image-editing instructions. Every answer is a fact taken from DICOM tags or source metadata, never invented."""

from __future__ import annotations

import numpy as np

# fact name -> question phrasings; answers come from ANSWER_FORMS (or the fact value itself)
QUESTIONS = {
    "modality_name": ("What imaging modality is this?", "Which imaging technique was used to acquire this image?",
                      "What kind of medical image is shown?"),
    "region": ("Which body region is shown in this image?", "What part of the body was imaged?",
               "Which anatomical region does this image cover?"),
    "view": ("What is the projection of this radiograph?", "Was this radiograph taken in AP or PA projection?"),
    "plane": ("In which anatomical plane is this slice?", "Is this an axial, coronal or sagittal image?"),
    "position": ("Which part of the volume is this {plane} slice from?",),
    "weighting": ("What is the MR contrast weighting of this image?", "Is this MRI T1- or T2-weighted?"),
    "exam": ("What type of ultrasound examination is this?",),
    "derived_map": ("Which map derived from the MRI is shown?", "What does this brain map show?"),
    "contrast": ("Was a contrast agent administered for this image?",),
    "color": ("Is this a grayscale or a colour image?",),
    "photometric": ("What is the DICOM photometric interpretation of this image?",),
    "frame": ("Is this image one frame of a multi-frame acquisition?",),
}
ANSWER_FORMS = {
    "view": {"PA": "PA (posteroanterior)", "AP": "AP (anteroposterior)", "LL": "lateral"},
    "position": "the {position} third",
    "frame": "yes, frame {frame_number} of {frame_count}",
}
MODALITY_PHRASES = {  # record modality code -> noun phrase for yes/no questions
    "CT": "a CT scan", "MRI": "an MRI scan", "CXR": "a chest radiograph", "XR": "a plain radiograph",
    "US": "an ultrasound image", "NM": "a nuclear medicine scan", "CFP": "a fundus photograph",
    "HIS": "a histology image", "MIC": "a microscopy image",
}
RADIOGRAPHS = {"CXR", "XR"}   # a chest radiograph is also a plain radiograph: never ask one as a negative for the other
CAPTION_PROMPTS = ("Describe this image.", "Write a short caption for this medical image.",
                   "What does this image show?", "Give a one-sentence description of this scan.")
GENERATION_PROMPTS = ("Generate {a} {desc}.", "Create {a} {desc}.", "Synthesize {a} {desc}.",
                      "Produce a realistic {desc}.")
INSTRUCTIONS = {
    "sr": ("Increase the resolution of this {desc} by {factor}x.",
           "Upscale this low-resolution {desc} {factor}x and restore fine detail.",
           "Super-resolve this {desc} by a factor of {factor}."),
    "denoise": ("Remove the noise from this {desc}.", "Denoise this {desc}.",
                "This {desc} is corrupted by Gaussian noise; restore a clean image."),
    "window": ("Re-window this CT image from the {src} window (L {src_c} / W {src_w}) to the {dst} window "
               "(L {dst_c} / W {dst_w}).",
               "Show this CT slice in the {dst} window (L {dst_c} / W {dst_w}) instead of the {src} window."),
    "translate": ("Convert this {desc} into the corresponding {target}.", "Predict the {target} for this {desc}."),
}


def article(phrase: str) -> str:
    """'a' or 'an' for a noun phrase (by its first letter)."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _fact_strings(facts: dict) -> dict:
    """Facts as format-ready strings, with slice / frame tuples split into numbers."""
    out = {k: v for k, v in facts.items() if isinstance(v, str)}
    if "frame" in facts:
        out["frame_number"], out["frame_count"] = facts["frame"][0] + 1, facts["frame"][1]
    if "slice" in facts:
        out["slice_number"], out["slice_count"] = facts["slice"][0] + 1, facts["slice"][1]
    return out


def answer(fact: str, facts: dict) -> str:
    """Ground-truth answer for a fact question."""
    form = ANSWER_FORMS.get(fact)
    if isinstance(form, dict):
        return form.get(facts[fact], facts[fact])
    if isinstance(form, str):
        return form.format(**_fact_strings(facts))
    return str(facts[fact])


def qa_turns(facts: dict, modality: str, extra_qa: tuple, rng: np.random.Generator,
             num_turns: int | None) -> list[tuple[str, str]]:
    """(question, answer) pairs: fact questions, source-metadata questions and a yes/no modality question.

    num_turns=None asks everything once (in a random order); otherwise that many, chosen at random."""
    strings = _fact_strings(facts)
    candidates = [(str(rng.choice(QUESTIONS[f])).format(**strings), answer(f, facts)) for f in QUESTIONS if f in facts]
    candidates += list(extra_qa)
    negatives = [m for m in MODALITY_PHRASES if m != modality and not {m, modality} <= RADIOGRAPHS]
    asked = modality if rng.random() < 0.5 else str(rng.choice(negatives))
    candidates.append((f"Is this {MODALITY_PHRASES[asked]}?", "yes" if asked == modality else "no"))
    order = rng.permutation(len(candidates))
    if num_turns is not None:
        order = order[:num_turns]
    return [candidates[i] for i in order]


def caption(description: str, facts: dict) -> str:
    """One-sentence caption from the description and the slice / frame facts."""
    text = description[0].upper() + description[1:]
    if "slice" in facts:
        i, n = facts["slice"]
        text += f", slice {i + 1} of {n} from the {facts['position']} third of the volume"
    if "frame" in facts:
        i, n = facts["frame"]
        text += f", frame {i + 1} of {n}"
    return text + "."


def generation_prompt(description: str, facts: dict, rng: np.random.Generator) -> str:
    """Text->image prompt from the description (plus the volume position for slices)."""
    desc = description + (f" from the {facts['position']} third of the volume" if "position" in facts else "")
    return str(rng.choice(GENERATION_PROMPTS)).format(a=article(desc), desc=desc)


def instruction(kind: str, rng: np.random.Generator, **fields) -> str:
    """Editing instruction of a kind ('sr', 'denoise', 'window', 'translate') filled with the given fields."""
    return str(rng.choice(INSTRUCTIONS[kind])).format(**fields)
