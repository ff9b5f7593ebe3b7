"""The reference store and resume on image data: stored reference log-probs are keyed on the images' bytes and
the processor's settings as well as the token ids (two prompts with the same text and other images never share
an entry), and a resume notices an image replaced under the same name."""

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dpokit
from dpokit.errors import ConfigError
from dpokit.training.metrics import read_metrics
from tolerances import assert_same_metrics

FAMILIES = ("tiny-random-llava", "tiny-random-idefics3")
NAMES = ["red", "green", "blue", "yellow"]
COLOURS_A = [(220, 30, 30), (30, 170, 60), (40, 70, 220), (230, 200, 20)]
COLOURS_B = [(120, 0, 160), (250, 140, 0), (0, 200, 200), (90, 90, 90)]  # other pixels, the same text
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
LN2_FP32 = float(torch.tensor(2.0).log())  # the loss is computed in fp32: -log sigmoid(0) = ln 2 rounded to fp32
PAIRS = 8  # 16 responses


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_pairs(folder: Path, colours: list[tuple[int, int, int]]) -> Path:
    """:data:`PAIRS` rows naming ``img0.png`` .. ``img3.png`` beside the file, drawn in ``colours``: the file's
    text does not depend on the colours, only the image files do."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(PAIRS):
        c = i % 4
        (folder / f"img{c}.png").write_bytes(png(colours[c]))
        rows.append({"images": [f"img{c}.png"],
                     "prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": f"Colour {i}?"}]}],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {NAMES[c]}."}]}],
                     "rejected": [{"role": "assistant",
                                   "content": [{"type": "text", "text": f"It is {NAMES[(c + 1) % 4]}."}]}]})
    path = folder / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(data: Path, family: str, mode: str, store: Path, **train) -> dict:
    """fp32, so the bounds of tolerances.py apply. Unshuffled, with the store computed in batches of the
    training's batch size: the store's first batch is then step 1's batch, the same groups padded alike, so the
    stored log-probs are the numbers the policy computes at step 1, bit for bit, on any hardware."""
    return {"model": {"name_or_path": family},
            "data": {"train": str(data), "max_length": 96, "max_prompt_length": 64},
            "loss": {"name": "sigmoid", "beta": 0.1},
            "reference": {"mode": mode, "store_dir": str(store), "batch_size": 2},
            "train": {"lr": 1e-3, "max_steps": 3, "seed": 3, "progress": False, "layout": "padded",
                      "precision": "fp32", "batch_size": 2, "shuffle": False, **train}}


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def store_note(err: str) -> str:
    lines = [line for line in err.splitlines() if "reference store" in line]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.mark.equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_store_equals_the_model_reference_and_is_keyed_on_the_images(tmp_path, family, capsys):
    a = colour_pairs(tmp_path / "a", COLOURS_A)
    b = colour_pairs(tmp_path / "b", COLOURS_B)
    assert a.read_bytes() == b.read_bytes()  # the same text (and so the same token ids): only the images differ
    store = tmp_path / "store"

    def run(data: Path, mode: str, name: str) -> list[dict]:
        return train_rows(dpokit.train(config(data, family, mode, store), run_dir=str(tmp_path / name)))

    model_a, store_a = run(a, "model", "model-a"), run(a, "store", "store-a")
    assert "16 responses computed, 0 reused" in store_note(capsys.readouterr().err)
    # The stored log-probs are computed by the same function in the same batches as the frozen copy's; what
    # differs is only where the numbers are kept: fp32 round-off at most (tolerances.py).
    assert_same_metrics(model_a, store_a, KEYS)
    # pi == pi_ref at step 1 and the store holds step 1's own numbers (config()): every implicit reward is
    # exactly 0 and the loss exactly ln 2, as with a text store.
    assert (store_a[0]["rewards/chosen"], store_a[0]["rewards/rejected"]) == (0.0, 0.0)
    assert store_a[0]["loss"] == LN2_FP32
    assert store_a[-1]["loss"] != store_a[0]["loss"]

    # A second run on the same data reuses every entry and reads the same numbers.
    again = run(a, "store", "store-a-again")
    assert "0 responses computed, 16 reused" in store_note(capsys.readouterr().err)
    assert [[r[k] for k in KEYS] for r in again] == [[r[k] for k in KEYS] for r in store_a]

    # The same text with other images: every entry is new (the token ids alone would have matched A's), in the
    # same store folder (same weights and processor), and the run equals a frozen copy's on B's images.
    store_b = run(b, "store", "store-b")
    note_b = store_note(capsys.readouterr().err)
    assert "16 responses computed, 0 reused" in note_b
    model_b = run(b, "model", "model-b")
    assert_same_metrics(model_b, store_b, KEYS)
    assert (store_b[0]["rewards/chosen"], store_b[0]["rewards/rejected"]) == (0.0, 0.0)
    # The images change the log-probs by far more than round-off (A's stored numbers would not have done).
    assert abs(store_b[0]["logps/chosen"] - store_a[0]["logps/chosen"]) > 1e-3
    shards = list(store.glob("*/shard-*.safetensors"))
    assert len({p.parent for p in shards}) == 1 and len(shards) == 2  # A's shard and B's, side by side
    assert sum(len(load_file(str(p))["logps"]) for p in shards) == 32


def test_store_keys_cover_the_images_and_the_processor_settings():
    from dpokit.data.tokenize import TokenizedGroup
    from dpokit.data.vision import VisionGroup
    from dpokit.models.vision import tiny_vision
    from dpokit.training.reference import group_keys, store_key

    ids = ([1, 5, 6], [[7, 2], [8, 2]])
    model_key = b"m" * 32
    text = group_keys(model_key, TokenizedGroup(*ids, "x:1"))
    # A group without images keys as a text group does: the text stores written before images stay valid.
    assert group_keys(model_key, VisionGroup(*ids, "x:1")) == text
    with_a = group_keys(model_key, VisionGroup(*ids, "x:1", images_sha256="aa" * 32))
    with_b = group_keys(model_key, VisionGroup(*ids, "x:1", images_sha256="bb" * 32))
    assert len({*text, *with_a, *with_b}) == 6  # every response of every group a key of its own

    model, processor = tiny_vision("tiny-random-llava")
    cfg = dpokit.load_config({"model": {"name_or_path": "tiny-random-llava"}})
    resized = copy.deepcopy(processor)
    resized.image_processor.size = {"shortest_edge": 20}  # other pixels from the same bytes
    renormalised = copy.deepcopy(processor)
    renormalised.image_processor.image_mean = [0.5, 0.5, 0.5]
    keys = [store_key(model, cfg, p) for p in (None, processor, copy.deepcopy(processor), resized, renormalised)]
    assert keys[1] == keys[2]  # the same settings, another object: the same key
    assert len({keys[0], keys[1], keys[3], keys[4]}) == 4
    bf16 = dpokit.load_config({"model": {"name_or_path": "tiny-random-llava"}, "train": {"precision": "bf16"}})
    fp32 = dpokit.load_config({"model": {"name_or_path": "tiny-random-llava"}, "train": {"precision": "fp32"}})
    assert store_key(model, bf16, processor) != store_key(model, fp32, processor)


def test_resume_refuses_an_image_replaced_under_the_same_name(tmp_path):
    family = "tiny-random-llava"
    data = colour_pairs(tmp_path / "a", COLOURS_A)
    cfg = config(data, family, "model", tmp_path / "store", max_steps=4, save_every=2)
    straight = dpokit.train(cfg, run_dir=str(tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    dpokit.train(cfg, run_dir=str(resumed), train__max_steps=2)  # stops after its step-2 checkpoint
    image = data.parent / "img1.png"
    original = image.read_bytes()
    image.write_bytes(png(COLOURS_B[1]))  # the data file itself is untouched
    with pytest.raises(ConfigError, match=r"^data\.train: an image the data names changed since the checkpoint"
                                          r" .*\(use --force to resume anyway\)$") as err:
        dpokit.train(cfg, run_dir=str(resumed), resume=True)
    assert "\n" not in str(err.value)
    image.write_bytes(original)  # as it was: the run resumes, and ends as the run never stopped
    dpokit.train(cfg, run_dir=str(resumed), resume=True)
    assert [r["step"] for r in train_rows(resumed)] == [1, 2, 3, 4]
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
