"""Scoring and evaluation with image prompts: a vision-language policy and its reference loaded with the
processor, and rows with images read, checked and tokenized exactly as training reads them
(``dpokit.data.vision``: the same image checks, the same processor call, the same pixel inputs), so the implicit
reward of an image pair here is the ``rewards/chosen`` training logged for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from dpokit.data.config import DataConfig
from dpokit.data.drops import DROP_REASONS
from dpokit.data.formats import PreferenceRow, Text
from dpokit.data.images import IMAGE_MARK, check_marks, decode, has_images, images_digest, split_images
from dpokit.data.load import Record, RowError, iter_records
from dpokit.data.vision import VisionEncoded, encode_vision, vision_rules
from dpokit.errors import DataError, DpokitError
from dpokit.evaluate.prompts import EvalPrompt, prompt_item
from dpokit.models.source import ModelSource
from dpokit.models.vision import is_vision_source, load_processor, load_vision_model


def load_vision_pair(policy_source: ModelSource, ref_source: ModelSource, processor_source: ModelSource,
                     dtype: str = "float32", trust_remote_code: bool = False,
                     attn_implementation: str = "sdpa") -> tuple[nn.Module, nn.Module, Any] | None:
    """(policy, reference, processor) when ``policy_source`` is a vision-language model, else None (a text
    model: the caller loads it). The reference is the run's: its starting model loaded again (the frozen copy
    training made of it; for LoRA, whose ``final/`` is merged, the adapter-disabled policy is those same
    weights), or the model named as reference. A text reference for an image policy is refused: it could not
    read the images the policy's log-probs are conditioned on."""
    from dpokit.models.source import runnable_attention

    if not is_vision_source(policy_source, trust_remote_code):
        if is_vision_source(ref_source, trust_remote_code):
            raise DpokitError(f"{ref_source.location}: a vision-language reference for the text policy "
                              f"{policy_source.location}; give a text reference")
        return None
    if not is_vision_source(ref_source, trust_remote_code):
        raise DpokitError(f"{ref_source.location}: the reference of the vision-language policy "
                          f"{policy_source.location} must be a vision-language model too")
    processor = load_processor(processor_source, trust_remote_code)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code,
                  attn_implementation=runnable_attention(attn_implementation))
    return load_vision_model(policy_source, **kwargs), load_vision_model(ref_source, **kwargs), processor


# ------------------------------------------------------------------------------------------------ score rows

def split_row(row: dict[str, Any], location: str, base: Path | None) -> tuple[dict[str, Any], list[bytes | str]]:
    """A score row without its images (image parts become marks, ``dpokit.data.images``) and its images' bytes
    (a drop reason in place of a file that cannot be read). A malformed row (``image_source``,
    ``image_mismatch``, ``wrong_type``) raises its one-line :class:`RowError`."""
    if not has_images(row):
        return row, []
    record, images = split_images(Record(location, row), base)
    return record.row, images


def encode_image_items(processor: Any, items: Sequence[tuple[Text, Sequence[Text]]],
                       images: Sequence[list[bytes | str]], locations: Sequence[str],
                       data_cfg: DataConfig) -> list[VisionEncoded | str]:
    """Tokenize (prompt, responses) rows with their images as training does (``dpokit.data.vision``): the same
    placeholder count check, the same decoding checks (a bad image is the row's drop reason) and the same
    processor call. Each result is a :class:`VisionEncoded` (``pixels`` included) or a drop reason."""
    rules = vision_rules(processor)
    out: list[VisionEncoded | str] = []
    for (prompt, responses), row_images, location in zip(items, images, locations):
        row = PreferenceRow(_chat(prompt, "user"), [_chat(r, "assistant") for r in responses], location, "score")
        check_marks(row, len(row_images))
        decoded = [decode(data) for data in row_images]
        bad = next((d for d in decoded if isinstance(d, str)), None)
        if bad is not None:
            out.append(bad)
            continue
        result = encode_vision(row, decoded, processor, rules, data_cfg)
        if isinstance(result, RowError):
            raise result
        out.append(result)
    return out


def _chat(value: Text, role: str) -> list[dict[str, Any]]:
    """Text as one turn of ``role`` (a processor renders images through its chat template only)."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def drop_line(location: str, reason: str, what: str = "not scored") -> str:
    """The one line that says why a row was left out."""
    return f"{location}: {what} ({reason}: {DROP_REASONS.get(reason, reason)})"


# ------------------------------------------------------------------------------------------------ eval prompts

JUDGE_NOTE = ("the prompts' images go to pi and pi_ref; a reward function or a judge reads text only, each "
              "image shown to it as [image]")
"""What ``eval.json`` says about an evaluation with image prompts (``images_note``)."""


def load_image_prompts(source: str, split: str, max_prompts: int | None, processor: Any, data_cfg: DataConfig,
                       log: Callable[[str], None]) -> tuple[list[EvalPrompt], list[list[int]], list[Any]]:
    """Distinct prompts of ``source`` with their images (as :func:`dpokit.evaluate.prompts.load_prompts`; two
    prompts with the same text and other images are two prompts), each tokenized as training tokenizes it: the
    prompt's ids (image tokens included) and its pixel inputs. A malformed row raises its one-line error; a row
    whose image cannot be read, or whose prompt is too long, is left out with one line saying so."""
    path = Path(source).expanduser()
    base = path.parent if path.is_file() else None
    seen: set[str] = set()
    items: list[EvalPrompt] = []
    ids: list[list[int]] = []
    pixels: list[Any] = []
    for record in iter_records(source, split):
        text_record, images = split_images(record, base) if has_images(record.row) else (record, [])
        item = prompt_item(text_record)
        key = json.dumps(item.prompt, sort_keys=True) + images_digest(images).hex()
        if key in seen or not (images or item.text.strip()):
            continue
        seen.add(key)
        encoded = encode_image_items(processor, [(item.prompt, ["x"])], [images], [record.location], data_cfg)[0]
        if isinstance(encoded, str):
            log(drop_line(record.location, encoded, "prompt left out"))
            continue
        items.append(replace(item, text=item.text.replace(IMAGE_MARK, "[image]")))
        ids.append(encoded.prompt_ids)
        pixels.append(encoded.pixels)
        if max_prompts is not None and len(items) >= max_prompts:
            break
    if not items:
        raise DataError(f"{source}: no usable prompts")
    log(JUDGE_NOTE)
    return items, ids, pixels
