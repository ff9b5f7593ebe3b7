"""The movie-review openings the sentiment recipe continues: made here, from templates, deterministically.

The paper (Section 6.1) prompts its policy with prefixes of IMDb reviews. dpokit ships no IMDb text (and runs
offline), so it builds short, sentiment-neutral openings from templates instead: each one names a film and
stops where a reviewer would say what they thought, so the continuation carries the sentiment and the
ground-truth reward (VADER on the continuation alone) measures the policy, not the prompt.

``build_openings()`` is the single source of the shipped file ``data/sentiment_prompts.jsonl``
(``python -m dpokit.recipes.openings`` rewrites it; a test checks the two agree): every opening has 2 to 8
words, no two are equal, and one in five is held out (``"split": "heldout"``) for evaluation only.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("data") / "sentiment_prompts.jsonl"
N_OPENINGS = 800
HELDOUT_EVERY = 5  # every 5th opening (in the shuffled order) is held out: 160 of 800
SEED = 2305_18290  # the DPO paper's arXiv number

NOUNS = ["movie", "film", "sequel", "remake", "documentary", "comedy", "thriller", "horror movie", "western",
         "musical", "cartoon", "drama", "mini-series", "biopic", "war movie", "romance", "adaptation",
         "mystery", "animated film", "crime drama", "sci-fi film", "picture"]
ASPECTS = ["acting", "plot", "ending", "script", "soundtrack", "dialogue", "pacing", "cinematography", "story",
           "casting", "humor", "direction", "editing", "music", "opening scene", "final act", "lead actor",
           "special effects", "set design", "villain", "first half", "score"]
PREDICATES = ["is", "was", "felt", "turned out to be", "is about", "left me", "made me", "reminded me of",
              "tries to", "starts with", "really", "has"]
SEEN = ["watched", "saw", "rented", "streamed", "caught"]
WHEN = ["last night", "yesterday", "with my family", "on a whim", "at the cinema", "on TV", "twice",
        "with friends", "on a plane", "this weekend", "as a kid", "again"]
COMPANIONS = ["My wife", "My husband", "My kids", "My friends", "My brother", "My sister", "My parents",
              "My girlfriend", "My boyfriend", "My roommate", "My dad", "My mom"]
LEAD_INS = ["To be honest,", "After all the hype,", "As a fan of the book,", "Compared to the original,",
            "Despite the low budget,", "On paper,", "Twenty minutes in,", "By the end,", "From the first scene,",
            "Believe it or not,", "Without spoiling anything,", "As a critic,"]
ABOUT = ["When I first heard about this {noun},", "Going into this {noun}, I", "Everyone told me that this {noun}",
         "I finally got around to this {noun}", "After reading the reviews of this {noun},",
         "I walked out of this {noun}", "This is the kind of {noun} that", "So I watched this {noun} because",
         "I went into this {noun} knowing", "It is hard to describe this {noun}", "I did not expect this {noun} to",
         "What can I say about this {noun}?"]
FIXED = ["Let me start by saying", "Having seen the trailer, I", "Halfway through, I realized",
         "I have seen a lot of films, and", "The moment the credits rolled,", "I rarely write reviews, but",
         "I went in knowing nothing and", "I did not expect much, but", "It took me two tries to",
         "I have mixed memories of this one"]


def _families() -> list[list[str]]:
    """Candidate openings by template, each family in a fixed order."""
    return [
        [f"{det} {noun} {pred}" for det, noun, pred in itertools.product(["This", "The"], NOUNS, PREDICATES)],
        [f"The {aspect} {prep} this {noun}" for aspect, prep, noun in
         itertools.product(ASPECTS, ["of", "in"], NOUNS)],
        [f"The {aspect} {prep} this {noun} {verb}" for aspect, prep, noun, verb in
         itertools.product(ASPECTS, ["of", "in"], NOUNS, ["was", "is"])],
        [f"I {seen} this {noun} {when}" for seen, noun, when in itertools.product(SEEN, NOUNS, WHEN)],
        [f"{who} and I {seen} this {noun}" for who, seen, noun in itertools.product(COMPANIONS, SEEN, NOUNS)],
        [f"{lead} this {noun}" for lead, noun in itertools.product(LEAD_INS, NOUNS)],
        [template.format(noun=noun) for template, noun in itertools.product(ABOUT, NOUNS)] + FIXED,
    ]


def build_openings(n: int = N_OPENINGS, seed: int = SEED) -> list[dict[str, str]]:
    """``n`` distinct openings of 2 to 8 words as rows ``{"prompt", "split"}``, the same on every machine.

    Each template family is shuffled with its own seeded generator and the families are taken from in turn, so
    every template is represented about equally and the file is a stable function of this code."""
    families = []
    for index, family in enumerate(_families()):
        kept = sorted({text for text in family if 2 <= len(text.split()) <= 8})
        random.Random(seed + index).shuffle(kept)
        families.append(kept)
    seen: set[str] = set()
    openings: list[str] = []
    for round_robin in itertools.zip_longest(*families):
        for text in round_robin:
            if text is not None and text.lower() not in seen and len(openings) < n:
                seen.add(text.lower())
                openings.append(text)
    if len(openings) < n:
        raise ValueError(f"the templates make only {len(openings)} distinct openings, fewer than {n}")
    return [{"prompt": text, "split": "heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"}
            for i, text in enumerate(openings)]


def write_openings(path: Path = PROMPTS_FILE) -> Path:
    rows = build_openings()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_openings())
