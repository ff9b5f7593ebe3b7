"""The prompts ``dpokit eval`` (and the rollouts, and the live page) sample from: distinct prompts of a file, with
the dataset's chosen response when it has one, as the policy receives them and as a reward function or a judge
reads them."""

from __future__ import annotations

import json
from dataclasses import dataclass

from dpokit.data.columns import apply_columns
from dpokit.data.formats import Text, normalize
from dpokit.data.images import has_images
from dpokit.data.load import Record, iter_records
from dpokit.errors import DataError


@dataclass
class EvalPrompt:
    prompt: Text
    """As the policy receives it: text, or chat messages (rendered with the chat template)."""
    text: str
    """As a reward function or a judge reads it."""
    chosen: str | None = None
    """The dataset's preferred response, when the prompt came from a preference file."""


def text_of(value: Text) -> str:
    """Plain text of a prompt or a response: a message list reads as its contents (one message: just its
    content; several: ``role: content`` paragraphs)."""
    if isinstance(value, str):
        return value
    if len(value) == 1:
        return value[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in value)


def load_prompts(source: str, split: str = "test", max_prompts: int | None = None,
                 columns: dict[str, str] | None = None) -> list[EvalPrompt]:
    """Distinct prompts of a file (or hub dataset): rows of ``{"prompt": ...}`` or any preference format, in
    file order, read through ``data.columns`` (``columns``) as training reads them. A preference row's chosen
    response is kept as a possible baseline."""
    prompts: dict[str, EvalPrompt] = {}
    for record in iter_records(source, split):
        item = prompt_item(record, columns)
        key = json.dumps(item.prompt, sort_keys=True)
        if key not in prompts and text_of(item.prompt).strip():
            prompts[key] = item
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise DataError(f"{source}: no usable prompts")
    return list(prompts.values())


def prompt_item(record: Record, columns: dict[str, str] | None = None) -> EvalPrompt:
    """The prompt of one row (``{"prompt": ...}`` or any preference format), with its chosen response."""
    row = apply_columns(record.row, columns, record.location)
    if has_images(row):  # the images would be left out: they are read for a vision-language model only
        raise DataError(f"{record.location}: a row with images; sampling from it needs a vision-language model "
                        "(a run whose config has a vision_config)")
    if "chosen" in row or "rejected" in row or "responses" in row:
        norm = normalize(record, columns)
        return EvalPrompt(norm.prompt, text_of(norm.prompt), _response_text(norm.chosen))  # ranked: the best
    if "prompt" not in row:
        raise DataError(f"{record.location}: no 'prompt' (and no preference fields)")
    prompt = row["prompt"]
    if isinstance(prompt, dict) and "role" in prompt:
        prompt = [prompt]
    valid = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
        for m in prompt))
    if not valid:
        raise DataError(f"{record.location}: 'prompt' must be a string or a list of messages")
    return EvalPrompt(prompt, text_of(prompt))


def _response_text(value: Text) -> str:
    if isinstance(value, str):
        return value
    return "\n\n".join(m["content"] for m in value if m["role"] == "assistant") or text_of(value)
