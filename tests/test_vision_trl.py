"""Cross-check against TRL's DPOTrainer on a tiny vision-language model: the same images, prompts and answers give
the same token ids (or differ by the one token named below), the same per-pair loss and the same gradients."""

import contextlib
import copy
import json

import pytest
import torch
from PIL import Image

from dpokit.config import load_config
from dpokit.data.batch import collate_tokenized
from dpokit.data.config import DataConfig
from dpokit.data.vision import load_vision
from dpokit.methods.dpo import pair_forward
from dpokit.models.vision import tiny_vision, vision_template
from dpokit.training.distributed import LogpsModule
from dpokit.training.reference import FrozenReference

trl = pytest.importorskip("trl")

FAMILIES = ("tiny-random-llava", "tiny-random-idefics3")
COLOURS = {"red": (220, 30, 30), "blue": (40, 70, 220)}


def rows_and_file(tmp_path):
    rows = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        Image.new("RGB", (24, 20), colour).save(tmp_path / f"{name}.png")
        other = "blue" if name == "red" else "red"
        rows.append({"images": [f"{name}.png"],
                     "prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": f"Colour {i}?"}]}],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]}],
                     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"No, {other}."}]}]})
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    in_memory = [{**r, "images": [Image.open(tmp_path / r["images"][0]).convert("RGB")]} for r in rows]
    return in_memory, path


def trl_trainer(tmp_path, policy, reference, processor, rows):
    from datasets import Dataset

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=1, report_to=[],
                         max_length=None, beta=0.1, use_cpu=True, bf16=False)
    return trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=processor)


def trl_sequences(batch):
    """Each row's ids (padding removed) and the ids TRL scores (its completion mask)."""
    out = []
    for ids, mask, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        out.append((ids[mask.bool()].tolist(), ids[completion.bool()].tolist()))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_differ_from_trl_only_by_the_newline_after_the_end_of_turn(tmp_path, family):
    """TRL cuts each answer out of the rendered conversation as text, so ChatML's "\\n" after <|im_end|> is
    part of its completion and trained on; dpokit ends a response at its end-of-turn token (a model that
    learns that newline learns to emit a token after its stop token). Everything before it is the same."""
    model, processor = tiny_vision(family)
    rows, path = rows_and_file(tmp_path)
    trainer = trl_trainer(tmp_path, model, copy.deepcopy(model), processor, rows)
    groups, _ = load_vision(str(path), processor, DataConfig(max_length=96, max_prompt_length=64))
    newline = processor.tokenizer.convert_tokens_to_ids("Ċ")
    for row, group in zip(rows, groups):
        batch = trainer.data_collator([copy.deepcopy(row)])
        (chosen, chosen_scored), (rejected, rejected_scored) = trl_sequences(batch)
        assert chosen == group.prompt_ids + group.chosen_ids + [newline]
        assert rejected == group.prompt_ids + group.rejected_ids + [newline]
        assert chosen_scored == group.chosen_ids + [newline] and rejected_scored == group.rejected_ids + [newline]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_equal_trl_per_pair(tmp_path, family):
    """With a template that renders nothing after the end-of-turn token the ids are the same, and so must be
    every number: the per-pair loss and the gradient of every weight (the policy moved off the reference, so
    the loss is not ln 2)."""
    base, processor = tiny_vision(family)
    processor.chat_template = vision_template("<image>").replace("'<|im_end|>' + '\n'", "'<|im_end|>'")
    with torch.no_grad():
        moved = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(0)
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    ours_policy, ours_reference = copy.deepcopy(moved), copy.deepcopy(base)
    rows, path = rows_and_file(tmp_path)
    trainer = trl_trainer(tmp_path, moved, base, processor, rows)
    groups, _ = load_vision(str(path), processor, DataConfig(max_length=96, max_prompt_length=64))
    cfg = load_config({"loss": {"name": "sigmoid", "beta": 0.1}})
    module, reference = LogpsModule(ours_policy), FrozenReference(ours_reference)
    for row, group in zip(rows, groups):
        batch = trainer.data_collator([copy.deepcopy(row)])
        assert [ids for ids, _ in trl_sequences(batch)] == [group.prompt_ids + r for r in group.responses_ids]
        trainer.model.zero_grad()
        theirs = trainer.compute_loss(trainer.model, batch)
        theirs.backward()
        ours_batch = collate_tokenized([group], processor.tokenizer.pad_token_id, layout="padded")
        ours_policy.zero_grad()
        ours = pair_forward(module, reference, ours_batch, [group], cfg, contextlib.nullcontext)["losses"]
        ours.sum().backward()
        # One pair: fp32 sums over ~40 positions of log-softmaxes over 513 tokens, in another order and, for
        # dpokit, the head applied to response positions only: ~sqrt(n) * EPS32 relative, far below 1e-5.
        assert abs(ours.item() - theirs.item()) <= 1e-5 * max(1.0, abs(theirs.item()))
        assert abs(theirs.item() - 0.6931) > 1e-3  # the policy differs from the reference
        grads_theirs = dict(trainer.model.named_parameters())
        scale = max(p.grad.abs().max().item() for p in ours_policy.parameters() if p.grad is not None)
        assert scale > 0
        for name, p in ours_policy.named_parameters():
            other = grads_theirs[name].grad
            if p.grad is None:  # outside the computation on both sides (e.g. CLIP's unused post-layernorm)
                assert other is None or not other.any(), name
                continue
            # Each gradient element sums the same products in another order: round-off ~1e-6 of the largest
            # gradient; 1e-4 of it leaves room while a wrong token, mask or image moves elements by far more.
            assert other is not None and torch.allclose(p.grad, other, rtol=0, atol=1e-4 * scale), name
