"""Vision-language models: what tells one apart from a text model, loading it with its processor, the tiny
random ones built in code for tests, freezing the vision tower, and LoRA on the language model only.

A model is a vision-language model when its config has a ``vision_config`` (LLaVA, Idefics3 / SmolVLM,
Qwen2-VL, Gemma 3, ...): it loads with ``AutoModelForImageTextToText`` and ``AutoProcessor``, whose image
processor turns images into pixel inputs and whose chat template places each image's tokens in the prompt.

The tiny models (``tiny-random-llava``, ``tiny-random-idefics3``) are two families whose image tokens differ:
LLaVA repeats one ``<image>`` token once per image feature and takes a flat list of images
(``pixel_values`` (N, C, H, W)); Idefics3 frames the image tokens with ``<fake_token_around_image>`` and
``<global-img>`` and takes images per row (``pixel_values`` (B, N, C, H, W) with a ``pixel_attention_mask``).
Their tokenizer is the text tiny tokenizer with the image tokens added, so no download is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from dpokit.errors import ModelError
from dpokit.models.source import DTYPES, ModelSource, check_remote_code, seeded_model, tiny_tokenizer

TINY_VISION = ("tiny-random-llava", "tiny-random-idefics3")
"""Tiny random vision-language models built in code (tests, ``configs/tiny-vision.yaml``)."""

VISION_PARTS = ("vision_tower", "vision_model", "visual")
"""Module names of the vision encoder in the families transformers ships (LLaVA, Idefics3 / SmolVLM,
Qwen2-VL); ``model.freeze_vision`` freezes the parameters under them. The projector / connector stays
trainable, as the community recipes keep it."""

LANGUAGE_PARTS = ("language_model", "text_model")
"""Module names of the language model inside a vision-language model: LoRA adapts Linear layers under them."""

_IMAGE_TEXT = {"tiny-random-llava": "<image>", "tiny-random-idefics3": "<image>"}


def vision_template(image: str) -> str:
    """ChatML whose message content may be a list of parts: an image part renders as ``image`` (the token the
    processor expands), a text part as its text."""
    return (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + image + "' }}"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def is_vision_source(source: ModelSource, trust_remote_code: bool = False) -> bool:
    """Whether ``source`` is a vision-language model (its config has a ``vision_config``)."""
    if source.kind == "tiny":
        return source.location in TINY_VISION
    if source.kind == "folder":
        try:
            config = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # the text loader reports an unreadable config
        return isinstance(config, dict) and "vision_config" in config
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location, revision=source.revision,
                                            trust_remote_code=trust_remote_code)
    except Exception:  # the text loader says why the model cannot be read
        return False
    return hasattr(config, "vision_config")


def tiny_vision(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, processor) of a tiny random vision-language model named in :data:`TINY_VISION`."""
    if name == "tiny-random-llava":
        return _tiny_llava(seed)
    if name == "tiny-random-idefics3":
        return _tiny_idefics3(seed)
    raise ModelError(f"model.name_or_path: no tiny vision-language model named {name!r}")


def _tiny_text_config(vocab_size: int) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _tiny_llava(seed: int) -> tuple[nn.Module, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # 16 x 16 pixels in 4 x 4 patches: 16 image tokens per image (the CLS feature is dropped, "default").
    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=vision_template("<image>"))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_tiny_text_config(len(tokenizer))),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         tie_word_embeddings=False)
    return seeded_model(LlavaForConditionalGeneration, config, seed), processor


def _tiny_idefics3(seed: int) -> tuple[nn.Module, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]})
    # One 16 x 16 image, not split into tiles: 4 image tokens after the 2 x 2 pixel shuffle.
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 16},
                                       max_image_size={"longest_edge": 16})
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=vision_template("<image>"))
    config = Idefics3Config(
        text_config={"model_type": "llama", **_tiny_text_config(len(tokenizer))},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    return seeded_model(Idefics3ForConditionalGeneration, config, seed), processor


def load_processor(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The model's processor (image processor, tokenizer, chat template); a pad token set when it has none."""
    if source.kind == "tiny":
        processor = tiny_vision(source.location)[1]
    else:
        check_remote_code(source, trust_remote_code)
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(source.location, revision=source.revision,
                                                      trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ModelError(f"{source.location}: cannot load the processor ({_short(exc)})") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ModelError(f"{source.location}: the processor has no tokenizer or no image processor")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id serves
    return processor


def load_vision_model(source: ModelSource, dtype: str = "float32", trust_remote_code: bool = False,
                      attn_implementation: str = "sdpa") -> nn.Module:
    """The model with its own class (``AutoModelForImageTextToText``), from a folder, the hub or built in code."""
    if source.kind == "tiny":
        model = tiny_vision(source.location)[0].to(DTYPES[dtype])
        model.config._attn_implementation = attn_implementation
        return model
    from transformers import AutoModelForImageTextToText

    check_remote_code(source, trust_remote_code)
    try:
        return AutoModelForImageTextToText.from_pretrained(
            source.location, revision=source.revision, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation)
    except Exception as exc:
        raise ModelError(f"{source.location}: cannot load the vision-language model ({_short(exc)})") from None


def freeze_vision(model: nn.Module) -> int:
    """Freeze the vision encoder's parameters (:data:`VISION_PARTS`); returns how many tensors were frozen. A
    vision-language model without a recognized encoder is refused, so the setting is never silently void."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if any(f".{part}." in f".{name}" for part in VISION_PARTS):
            parameter.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ModelError(f"model.freeze_vision: no vision encoder found in {type(model).__name__} (looked for "
                         f"modules named {', '.join(VISION_PARTS)}); set model.freeze_vision: false")
    return frozen


def language_lora_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """The full names of the Linear layers LoRA adapts: under the language model (:data:`LANGUAGE_PARTS`) only,
    never the vision encoder, the projector or the output head; ``all-linear`` takes every such layer, a list
    of names those whose last name part is in it."""
    wanted = None if target_modules == "all-linear" else (
        {target_modules} if isinstance(target_modules, str) else set(target_modules))
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(f".{part}." in f".{name}" for part in LANGUAGE_PARTS)
             and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise ModelError(f"model.lora.target_modules: no Linear layer of the language model matches "
                         f"{target_modules!r}")
    return names


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
