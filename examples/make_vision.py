"""Draw the shipped image preference example: small PNGs of coloured shapes (examples/vision/) and
examples/prefs-vision.jsonl / prefs-vision-eval.jsonl, pairs preferring the right colour or shape over a wrong one,
in TRL's conversational format with an ``images`` column. Deterministic: run it again and the files are the same.

    python examples/make_vision.py
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZE = 32
HERE = Path(__file__).resolve().parent


def draw(shape: str, colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    box = (6, 6, SIZE - 7, SIZE - 7)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(SIZE // 2, 5), (SIZE - 6, SIZE - 7), (5, SIZE - 7)], fill=colour)
    return image


def row(image: str, question: str, chosen: str, rejected: str) -> dict:
    return {"images": [image],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}


def main() -> None:
    (HERE / "vision").mkdir(exist_ok=True)
    rows = []
    colours = list(COLOURS)
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(colours):
            name = f"vision/{colour}-{shape}.png"
            draw(shape, COLOURS[colour]).save(HERE / name, optimize=True)
            wrong_colour = colours[(c + 1 + s) % len(colours)]
            wrong_shape = SHAPES[(s + 1 + c % 2) % len(SHAPES)]  # offset 1 or 2: never the right one
            rows.append(row(name, "What colour is the shape?", f"It is {colour}.", f"It is {wrong_colour}."))
            rows.append(row(name, "What shape is this?", f"A {shape}.", f"A {wrong_shape}."))
    train, held_out = rows[:18], rows[18:]
    for name, part in (("prefs-vision.jsonl", train), ("prefs-vision-eval.jsonl", held_out)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for item in part:
                f.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    main()
