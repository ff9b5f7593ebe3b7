"""Image preference data for a vision-language model: rows read and counted as text rows are
(``dpokit.data.pipeline.account``: rows read = kept + dropped by reason), tokenized through the model's processor
and chat template, and the pixel inputs carried with each group to the batch.

Tokenization keeps the text rules (``dpokit.data.tokenize``): the prompt is rendered with the generation prompt
and each full conversation without it, both turned into ids by the processor, which expands every image
placeholder into that image's tokens (LLaVA: one ``<image>`` per feature; Idefics3: the features framed by
``<fake_token_around_image>`` and ``<global-img>``). The prompt's ids, image tokens included, are a prefix of
each prompt+response's ids (else the response is tokenized alone and counted as a boundary fallback); one end
token closes each response; one BOS where the tokenizer uses one. Responses are cut to fit ``max_length`` as
for text, but a prompt with images longer than ``max_prompt_length`` is dropped (``image_prompt_too_long``):
cutting it could split an image's tokens from its pixels.

Groups are held in memory (the tokenized-data cache stores token ids only, not pixels): image data is
tokenized on every run. A group's pixel inputs are the processor's own tensors for its prompt
(:data:`PIXEL_KEYS`); :func:`collate_pixels` lays them out for the padded layout's rows (each response is a row
of its own, so each row gets its group's images). The packed layout is refused for image data.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.data import memory
from dpokit.data.config import DataConfig
from dpokit.data.drops import drop_reason, row_digest, strip_invisible
from dpokit.data.formats import PreferenceRow, normalize
from dpokit.data.images import as_parts, check_marks, decode, has_images, images_digest, split_images
from dpokit.data.load import Record, RowError, scan_records
from dpokit.data.pipeline import DataReport, LengthSummary, Outcome, Want, account
from dpokit.data.tokenize import (
    Encoded,
    TokenizedGroup,
    TokenRules,
    _close,
    _encode,
    _fit,
    _fix_bos,
    _render_chat,
    token_rules,
)
from dpokit.errors import DataError

PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw")
"""The processor outputs carried to the model. Any other output (a per-token type id, a video input) is
refused in one line rather than dropped: the model would compute something else without it."""

ROW_NDIM = {"pixel_values": 5, "pixel_attention_mask": 4}
"""Keys that come per text row, ``(rows, images, ...)`` (Idefics3 / SmolVLM) when they have this many dimensions;
every other pixel input is a flat list over the batch's images, ``(images or patches, ...)`` (LLaVA, Qwen2-VL)."""


@dataclass
class VisionGroup(TokenizedGroup):
    """A :class:`TokenizedGroup` whose prompt holds images: ``prompt_ids`` include their tokens, ``pixels``
    the processor's tensors for them (empty for a prompt without images)."""

    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    images_sha256: str = ""
    """sha256 of the prompt's images' encoded bytes, in order."""


@dataclass
class VisionEncoded(Encoded):
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)


def load_vision(source: str, processor: Any, data_cfg: DataConfig, split: str = "train",
                want: Want = "pairs") -> tuple[list[VisionGroup], DataReport]:
    """The groups of a source with images, and its report (as ``dpokit.data.load_preferences``)."""
    report = DataReport(source=source)
    path = Path(source).expanduser()
    base = path.parent if not memory.is_memory(source) and path.is_file() else None
    records = scan_records(source, split, data_cfg.max_rows, data_cfg.max_line_bytes, data_cfg.streaming)
    groups = []
    per_row, widths, heights = LengthSummary(), LengthSummary(), LengthSummary()
    for outcome, pieces in account(vision_outcomes(records, processor, data_cfg, base), report, data_cfg, want):
        encoded, row = outcome.encoded, outcome.row
        assert isinstance(encoded, VisionEncoded) and isinstance(outcome, VisionOutcome) and row is not None
        per_row.add(len(outcome.sizes))
        for width, height in outcome.sizes:
            widths.add(width)
            heights.add(height)
        for responses in pieces:
            groups.append(VisionGroup(encoded.prompt_ids, [encoded.responses_ids[i] for i in responses],
                                      row.location, encoded.boundary_fallback, encoded.truncated, label=row.label,
                                      pixels=encoded.pixels, images_sha256=outcome.images_sha256))
    report.images = {"total": widths.count, "per_row": per_row.stats(), "width": widths.stats(),
                     "height": heights.stats()}
    return groups, report


@dataclass
class VisionOutcome(Outcome):
    images_sha256: str = ""
    sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each image, as decoded."""


def vision_outcomes(records: Iterable[Record | RowError], processor: Any, data_cfg: DataConfig,
                    base: Path | None) -> Iterator[Outcome]:
    """``dpokit.data.pipeline.row_outcomes`` for rows with images: the images split off (``dpokit.data.images``),
    the text rules, the images decoded (a bad one is the row's drop reason), the tokenization."""
    rules = vision_rules(processor)
    for record in records:
        outcome = VisionOutcome()
        if isinstance(record, RowError):
            outcome.error = record
            yield outcome
            continue
        try:
            text_record, images = split_images(record, base) if has_images(record.row) else (record, [])
            row = _as_chat(normalize(text_record, data_cfg.columns))
            check_marks(row, len(images))
        except RowError as err:
            outcome.error = err
            yield outcome
            continue
        outcome.row = row
        outcome.invisible = strip_invisible(row)
        outcome.reason = drop_reason(row.prompt, row.responses, allow_empty_prompt=row.format.startswith("implicit"))
        if outcome.reason is None and row.levels is not None and row.levels[-1] == 0:
            outcome.reason = "all_tied"
        sha = images_digest(images)
        outcome.images_sha256 = sha.hex() if images else ""
        mixed = hashlib.blake2b(row_digest(row).to_bytes(8, "little") + sha, digest_size=8).digest()
        outcome.digest = int.from_bytes(mixed, "little") if images else row_digest(row)
        if outcome.reason is None:
            decoded = [decode(data) for data in images]
            bad = next((d for d in decoded if isinstance(d, str)), None)
            outcome.reason = bad
            if bad is None:
                outcome.sizes = [image.size for image in decoded]
                outcome.encoded = encode_vision(row, decoded, processor, rules, data_cfg)
        yield outcome


def _as_chat(row: PreferenceRow) -> PreferenceRow:
    """A text row as one user turn and assistant turns: a processor renders images through its chat template."""
    if isinstance(row.prompt, str):
        row.prompt = [{"role": "user", "content": row.prompt}]
        row.responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in row.responses]
    return row


def vision_rules(processor: Any) -> TokenRules:
    """The tokenizer's BOS / EOS rules, with the end-of-turn token read from the processor's chat template (a
    vision-language model's tokenizer often has no template of its own)."""
    tokenizer = processor.tokenizer
    rules = token_rules(tokenizer)
    probe = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "dpokit-probe-4f1d"}]}]
    try:
        rendered = processor.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that cannot render the probe: rows will say why
        return rules
    if not isinstance(rendered, str) or "dpokit-probe-4f1d" not in rendered:
        return rules
    tail = rendered[rendered.rindex("dpokit-probe-4f1d") + len("dpokit-probe-4f1d"):].strip()
    ids = _encode(tokenizer, [tail])[0] if tail else []
    if len(ids) == 1:
        return dataclasses.replace(rules, eot_text=tail, eot_id=ids[0], split_tokens=())
    return dataclasses.replace(rules, split_tokens=())


def encode_vision(row: PreferenceRow, images: list[Any], processor: Any, rules: TokenRules,
                  data_cfg: DataConfig) -> VisionEncoded | str | RowError:
    """Tokenize one row with its decoded images: a :class:`VisionEncoded`, a drop reason, or the row's
    :class:`RowError` when its chat template fails."""
    assert isinstance(row.prompt, list)
    responses = [as_parts(r) for r in row.responses if isinstance(r, list)]
    try:
        prompt_text, joints = _render_chat(processor, as_parts(row.prompt), responses, rules, row.location)
    except RowError as err:
        return err
    kwargs: dict[str, Any] = {"images": [images]} if images else {}
    first = processor(text=[prompt_text], add_special_tokens=False, return_tensors="pt", **kwargs)
    prompt_ids = first["input_ids"][0].tolist()
    pixels = {key: value for key, value in first.items() if key not in ("input_ids", "attention_mask")}
    unknown = sorted(set(pixels) - set(PIXEL_KEYS))
    if unknown:
        raise DataError(f"{row.location}: the processor returns {', '.join(unknown)}, which dpokit does not carry "
                        "to the model yet")
    n = len(prompt_ids)
    responses_ids, fallback = [], False
    for joint in joints:
        ids = processor(text=[joint], add_special_tokens=False, **kwargs)["input_ids"][0]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids[:n] == prompt_ids:
            ids = ids[n:]
        else:  # a merge across the join: the response alone (it holds no image)
            ids, fallback = _encode(processor.tokenizer, [joint[len(prompt_text):]])[0], True
        responses_ids.append(_close(ids, rules.eot_id, rules))
    prompt_ids = _fix_bos(prompt_ids, rules)
    if images and len(prompt_ids) > data_cfg.max_prompt_length:
        return "image_prompt_too_long"
    fit = _fit(prompt_ids, responses_ids, data_cfg.max_length, data_cfg.max_prompt_length, rules, fallback)
    if isinstance(fit, str):
        return fit
    return VisionEncoded(fit.prompt_ids, fit.responses_ids, fit.boundary_fallback, fit.truncated,
                         fit.prompt_truncated, pixels)


def collate_pixels(items: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The pixel inputs of a padded batch of groups, whose rows are each group's responses in order: a per-row
    input (:data:`ROW_NDIM`) gets one entry per row, padded with zero images to the most images of a row (the
    model skips all-zero images); a flat input gets each row's images in row order."""
    rows = [(item.pixels, len(item.responses_ids)) for item in items]
    keys = sorted({key for pixels, _ in rows for key in pixels})
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [pixels[key] for pixels, _ in rows if key in pixels]
        if present[0].dim() == ROW_NDIM.get(key):
            width = max(t.shape[1] for t in present)
            tail = present[0].shape[2:]
            pieces = []
            for pixels, k in rows:
                block = torch.zeros((1, width, *tail), dtype=present[0].dtype)
                if key in pixels:
                    block[:, :pixels[key].shape[1]] = pixels[key]
                pieces.extend([block] * k)
            out[key] = torch.cat(pieces)
        else:
            out[key] = torch.cat([pixels[key] for pixels, k in rows if key in pixels for _ in range(k)])
    return out
