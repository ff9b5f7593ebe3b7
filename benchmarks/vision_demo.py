"""A vision DPO demo small enough for 2 CPU cores: does DPO teach a tiny random vision-language model to use the
image? Shapes of four colours are drawn in code at random places and sizes; each pair prefers the right colour
("It is red.") over a wrong one drawn uniformly, so a model that ignores the image cannot beat chance on
held-out pairs (new images). The held-out implicit-reward accuracy (``rewards/accuracies`` of the eval rows) is
read before and after training, with a control: the same held-out pairs with each image replaced by one of
another colour, where a model that reads the colour from the pixels falls below chance.

    .venv/bin/python benchmarks/vision_demo.py --out /tmp/vision-demo

No SFT stage (``dpokit sft`` does not take images yet) and no answer accuracy (sampling with images is not built
yet): DPO alone, from random weights. Numbers go to docs/vision.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw

import dpokit
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


def accuracy(run_dir: Path) -> tuple[float, float]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    return rows[0]["rewards/accuracies"], rows[-1]["rewards/accuracies"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    train = write(args.out, "train", args.pairs, seed=1)
    held_out = write(args.out, "held_out", 100, seed=2)
    control = write(args.out, "control", 100, seed=2, swap=True)
    config = {"model": {"name_or_path": "tiny-random-llava"},
              "data": {"train": str(train), "max_length": 64, "max_prompt_length": 48},
              "loss": {"name": "sigmoid", "beta": 0.1},
              "train": {"layout": "padded", "lr": 1e-3, "batch_size": 16, "max_steps": args.steps,
                        "warmup_steps": 10, "seed": 0, "progress": False, "precision": "fp32",
                        "save_every": args.steps},
              "eval": {"every": args.steps}}
    results = {}
    for name, source in (("held_out", held_out), ("control", control)):
        started = time.perf_counter()
        config["data"]["eval"] = str(source)
        run = dpokit.train(config, run_dir=str(args.out / f"run-{name}"))
        results[name] = accuracy(run) + (time.perf_counter() - started,)
    for name, (before, after, seconds) in results.items():
        print(f"{name}: rewards/accuracies {before:.2f} -> {after:.2f} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
