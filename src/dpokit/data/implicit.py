"""Implicit-prompt rows: ``{"chosen": str, "rejected": str}`` holding whole dialogues, where the prompt is the
shared opening of the two texts up to the last assistant turn marker.

The guess is safe only when the texts are dialogues with a known turn marker. Taking the shared opening of two
plain answers as a prompt ("The answer is" -> " 42." / " 32.") trains on a prompt nobody wrote, so a split
needs a marker of one of the :data:`DIALOGUES` in the shared opening, and :func:`split_implicit` cuts just after
its last occurrence. After the cut, a response that still holds a turn marker of the same dialogue format
means the two conversations diverge before their last turn (Anthropic HH-RLHF has such rows): each response
would carry a later turn the other side never saw, so the row is refused like the same case in message lists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dialogue:
    """A plain-text dialogue format: the marker that opens an assistant turn (the prompt ends just after it,
    with the newlines that follow it in both texts) and the markers that open any turn."""

    name: str
    assistant: str
    turns: tuple[str, ...]


DIALOGUES = (
    Dialogue("Anthropic HH", "Assistant:", ("\n\nHuman:", "\n\nAssistant:")),
    Dialogue("ChatML", "<|im_start|>assistant", ("<|im_start|>",)),
    Dialogue("Llama 3", "<|start_header_id|>assistant<|end_header_id|>", ("<|start_header_id|>",)),
    Dialogue("Zephyr", "<|assistant|>", ("<|user|>", "<|assistant|>", "<|system|>")),
    Dialogue("Llama 2 / Mistral", "[/INST]", ("[INST]",)),
    Dialogue("Gemma", "<start_of_turn>model", ("<start_of_turn>",)),
    Dialogue("Alpaca", "### Response:", ("### Instruction:", "### Response:")),
)
"""The dialogue formats an implicit prompt is recognized in."""


@dataclass(frozen=True)
class Split:
    """An implicit-prompt row cut into prompt and responses, and the dialogue format it was cut in."""

    prompt: str
    chosen: str
    rejected: str
    dialogue: Dialogue

    def later_turn(self) -> tuple[str, str] | None:
        """(side, marker) when a response holds another turn: the conversations diverge before the last one."""
        for side, text in (("chosen", self.chosen), ("rejected", self.rejected)):
            for marker in self.dialogue.turns:
                if marker in text:
                    return side, marker
        return None


def split_implicit(chosen: str, rejected: str) -> Split | None:
    """Cut two full dialogue texts into prompt and responses just after the last assistant-turn marker in their
    shared opening (HH-RLHF: ``"\\n\\nHuman: q\\n\\nAssistant:"`` | ``" answer"``; ChatML: up to and including
    ``"<|im_start|>assistant\\n"``). None when the shared opening holds no marker of a known dialogue format
    (the texts are not dialogues, or they share nothing)."""
    prefix = os.path.commonprefix([chosen, rejected])  # character-wise for strings
    best: tuple[int, Dialogue] | None = None
    for dialogue in DIALOGUES:
        at = prefix.rfind(dialogue.assistant)
        if at >= 0 and (best is None or at + len(dialogue.assistant) > best[0]):
            best = (at + len(dialogue.assistant), dialogue)
    if best is None:
        return None
    cut, dialogue = best
    # The newline(s) a template puts after the header belong to the prompt (the generation prompt ends with
    # them); a space stays with the response, where byte-level BPE expects it (" word").
    while cut < len(prefix) and prefix[cut] == "\n":
        cut += 1
    return Split(chosen[:cut], chosen[cut:], rejected[cut:], dialogue)
