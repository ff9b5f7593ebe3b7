"""A vision demo small enough for 2 CPU cores: does a tiny random vision-language model learn to use the image,
first from SFT and then from DPO? Shapes of four colours are drawn in code at random places and sizes; each pair
prefers the right colour ("It is red.") over a wrong one drawn uniformly, so a model that ignores the image cannot
beat chance on held-out pairs (new images).

Stage 1, ``dpokit sft`` on the chosen answers ("It is <right colour>."), from random weights (lr 1e-3); stage 2,
``dpokit train`` (DPO: ``--loss sigmoid``, or ``rpo``, which adds the chosen answer's NLL; lr 1e-4) from the SFT
model, which is also its reference. Measured on 100 held-out images:

- answer accuracy: the fraction of images for which the model's greedy answer (``dpokit.models.generate`` with the
  image, temperature 0) names the right colour and no other, for pi_ref (the random start), after SFT and after
  DPO;
- the held-out implicit-reward accuracy (``rewards/accuracies`` of DPO's eval rows) at the start and end of DPO;
- a control: the same held-out pairs with each image redrawn in another colour than the chosen answer's, where a
  model that reads the colour from the pixels falls below chance (computed with the same log-prob function).

    .venv/bin/python benchmarks/vision_demo.py --out /tmp/vision-demo [--loss rpo]

Numbers go to docs/vision.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

import dpokit
from dpokit.data.batch import collate_tokenized, regroup
from dpokit.data.config import DataConfig
from dpokit.data.vision import VisionGroup, load_vision
from dpokit.models.generate import SamplingParams, generate
from dpokit.models.loading import resolve
from dpokit.models.logprobs import batch_logps
from dpokit.models.vision import load_processor, load_vision_model
from dpokit.training.metrics import read_metrics

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20)}


def draw(rng: random.Random, colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    size = rng.randint(10, 24)
    x, y = rng.randint(0, 32 - size), rng.randint(0, 32 - size)
    pen = ImageDraw.Draw(image)
    shape = rng.choice(["ellipse", "rectangle", "triangle"])
    if shape == "triangle":
        pen.polygon([(x + size // 2, y), (x + size, y + size), (x, y + size)], fill=colour)
    else:
        getattr(pen, shape)((x, y, x + size, y + size), fill=colour)
    return image


def write(folder: Path, name: str, n: int, seed: int, swap: bool = False) -> Path:
    """``n`` pairs with their PNGs; ``swap``: the same pairs, each image drawn in another colour (control)."""
    rng, names = random.Random(seed), list(COLOURS)
    (folder / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        right = names[i % 4]
        wrong = rng.choice([c for c in names if c != right])
        shown = rng.choice([c for c in names if c != right]) if swap else right
        draw(rng, COLOURS[shown]).save(folder / name / f"{i}.png")
        lines.append(json.dumps({
            "images": [f"{name}/{i}.png"],
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": "What colour is the shape?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {right}."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {wrong}."}]}]}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


MODEL, BETA = "tiny-random-llava", 0.1
DATA = {"max_length": 64, "max_prompt_length": 48}


def eval_accuracy(run_dir: Path) -> tuple[float, float]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    return rows[0]["rewards/accuracies"], rows[-1]["rewards/accuracies"]


def named(text: str) -> set[str]:
    """The colour words an answer names."""
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return {name for name in COLOURS if name in words}


def answer_accuracy(model: Any, processor: Any, groups: list[VisionGroup]) -> tuple[float, list[str]]:
    """The fraction of groups whose greedy answer names its chosen answer's colour and no other, and the first
    answers (to show what the model says)."""
    tokenizer = processor.tokenizer
    samples = generate(model, tokenizer, [g.prompt_ids for g in groups],
                       SamplingParams(max_new_tokens=16, temperature=0.0, batch_size=25),
                       pixels=[g.pixels for g in groups])
    right = [named(tokenizer.decode(g.chosen_ids, skip_special_tokens=True)) for g in groups]
    hits = [named(sample.text) == colour for sample, colour in zip(samples, right)]
    return sum(hits) / len(hits), [sample.text for sample in samples[:4]]


@torch.no_grad()
def reward_accuracy(policy: Any, reference: Any, pad_id: int, groups: list[VisionGroup]) -> float:
    """The implicit-reward accuracy of pairs, as DPO's eval computes it: beta * log pi/pi_ref of the chosen
    answer above the rejected one's (the one log-prob function, ``batch_logps``)."""
    hits = 0
    for start in range(0, len(groups), 20):
        batch = collate_tokenized(groups[start:start + 20], pad_id, layout="padded")
        logratios = regroup(batch_logps(policy, batch)[0] - batch_logps(reference, batch)[0], batch)
        hits += int((BETA * logratios[:, 0] > BETA * logratios[:, 1]).sum())
    return hits / len(groups)


def train_stages(out: Path, train: Path, held_out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """SFT from random weights, then DPO from the SFT model (its reference too); the run folders."""
    common = {"layout": "padded", "batch_size": 16, "warmup_steps": 10, "seed": 0, "progress": False,
              "precision": "fp32"}
    sft = dpokit.sft({"model": {"name_or_path": MODEL}, "data": {"train": str(train), **DATA},
                      "train": {**common, "lr": 1e-3, "max_steps": args.sft_steps, "save_every": args.sft_steps}},
                     run_dir=str(out / "run-sft"))
    dpo = dpokit.train({"model": {"name_or_path": str(sft / "final")},
                        "data": {"train": str(train), "eval": str(held_out), **DATA},
                        "loss": {"name": args.loss, "beta": BETA},
                        "train": {**common, "lr": args.dpo_lr, "max_steps": args.steps, "save_every": args.steps},
                        "eval": {"every": args.steps}}, run_dir=str(out / "run-dpo"))
    return {"sft": sft, "dpo": dpo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100, help="DPO steps")
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "rpo"],
                        help="DPO's loss: rpo adds the chosen answer's NLL (alpha 1), against likelihood displacement")
    parser.add_argument("--dpo-lr", type=float, default=1e-4,
                        help="DPO's learning rate; SFT's is 1e-3 (DPO at 1e-3 displaces the answers: docs/vision.md)")
    args = parser.parse_args()
    started = time.perf_counter()
    train = write(args.out, "train", args.pairs, seed=1)
    held_out = write(args.out, "held_out", 100, seed=2)
    control = write(args.out, "control", 100, seed=2, swap=True)
    runs = train_stages(args.out, train, held_out, args)
    trained = time.perf_counter()
    processor = load_processor(resolve(MODEL))
    data = DataConfig(**DATA)
    groups = {name: load_vision(str(path), processor, data)[0] for name, path in
              (("held_out", held_out), ("control", control))}
    models = {"pi_ref": load_vision_model(resolve(MODEL)),
              "sft": load_vision_model(resolve(str(runs["sft"] / "final"))),
              "dpo": load_vision_model(resolve(str(runs["dpo"] / "final")))}
    results: dict[str, Any] = {"pairs": args.pairs, "sft_steps": args.sft_steps, "dpo_steps": args.steps,
                               "dpo_lr": args.dpo_lr, "loss": args.loss}
    for name, model in models.items():
        model.eval()
        accuracy, shown = answer_accuracy(model, processor, groups["held_out"])
        results[f"answer_accuracy/{name}"] = accuracy
        print(f"{name}: answer accuracy {accuracy:.2f} on {len(groups['held_out'])} held-out images; "
              f"first answers {shown}")
    before, after = eval_accuracy(runs["dpo"])
    pad_id = processor.tokenizer.pad_token_id
    results["rewards/accuracies"] = {"start": before, "end": after}
    results["rewards/accuracies/recomputed"] = reward_accuracy(models["dpo"], models["sft"], pad_id, groups["held_out"])
    results["rewards/accuracies/control"] = reward_accuracy(models["dpo"], models["sft"], pad_id, groups["control"])
    results["seconds"] = {"training": trained - started, "total": time.perf_counter() - started}
    print(f"held-out rewards/accuracies (DPO eval) {before:.2f} -> {after:.2f}; recomputed at the end "
          f"{results['rewards/accuracies/recomputed']:.2f}; control (images in another colour) "
          f"{results['rewards/accuracies/control']:.2f}")
    print(f"{results['seconds']['training']:.0f} s training, {results['seconds']['total']:.0f} s in all")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
