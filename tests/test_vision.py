"""Preference data with images on vision-language models: reading and checking image rows, tokenizing through the
processor, the two tiny families (LLaVA, Idefics3), freezing and LoRA, and DPO trained end to end."""

import base64
import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import dpokit
from dpokit.config import load_config
from dpokit.data.config import DataConfig
from dpokit.data.images import IMAGE_MARK, as_parts
from dpokit.data.vision import collate_pixels, load_vision
from dpokit.errors import DataError, DpokitError
from dpokit.integrations.hub import front_matter
from dpokit.models.vision import tiny_vision
from dpokit.training.metrics import read_metrics
from tolerances import assert_same_metrics, assert_same_weights_after_adamw

FAMILIES = ("tiny-random-llava", "tiny-random-idefics3")
IMAGE_TOKENS = {"tiny-random-llava": 16, "tiny-random-idefics3": 4}
"""Image-token ids per image: LLaVA 16 x 16 pixels in 4 x 4 patches; Idefics3 the same after a 2 x 2 shuffle."""
COLOURS = [(220, 30, 30), (30, 170, 60), (40, 70, 220), (230, 200, 20)]


def png(colour, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def trl_row(image: str | list, question: str, chosen: str, rejected: str) -> dict:
    images = image if isinstance(image, list) else [image]
    return {"images": images,
            "prompt": [{"role": "user", "content": [*({"type": "image"} for _ in images),
                                                    {"type": "text", "text": question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}


def write_rows(folder: Path, rows: list[dict], name: str = "prefs.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def colour_pairs(folder: Path, n: int = 8) -> Path:
    """``n`` image pairs, the right colour preferred, with the PNGs beside the file."""
    names = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(n):
        c = i % 4
        (folder / f"img{c}.png").write_bytes(png(COLOURS[c]))
        rows.append(trl_row(f"img{c}.png", f"Colour {i}?", f"It is {names[c]}.", f"It is {names[(c + 1) % 4]}."))
    return write_rows(folder, rows)


DATA = DataConfig(max_length=96, max_prompt_length=64)


# ------------------------------------------------------------------------------------------------------ data

@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_with_image_tokens_are_a_prefix_of_the_model_input(tmp_path, family):
    processor = tiny_vision(family)[1]
    groups, report = load_vision(str(colour_pairs(tmp_path, 4)), processor, DATA)
    assert report.rows_read == report.rows_kept == 4 and len(groups) == 4
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for group in groups:
        assert group.prompt_ids.count(image_id) == IMAGE_TOKENS[family]
        # What the processor makes of the whole conversation is prompt_ids + response_ids, token for token.
        for response in group.responses_ids:
            text = processor.tokenizer.decode(group.prompt_ids + response)
            assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == group.prompt_ids + response
        assert group.chosen_ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")  # one end token
        assert group.chosen_ids.count(group.chosen_ids[-1]) == 1
    assert report.boundary_fallback == 0


def test_plain_form_and_trl_form_tokenize_alike(tmp_path):
    (tmp_path / "a.png").write_bytes(png(COLOURS[0]))
    processor = tiny_vision("tiny-random-llava")[1]
    trl = write_rows(tmp_path, [trl_row("a.png", "What colour?", "Red.", "Blue.")], "trl.jsonl")
    plain = write_rows(tmp_path, [{"image": "a.png", "prompt": "What colour?", "chosen": "Red.",
                                   "rejected": "Blue."}], "plain.jsonl")
    (a,), _ = load_vision(str(trl), processor, DATA)
    (b,), _ = load_vision(str(plain), processor, DATA)
    assert (a.prompt_ids, a.responses_ids) == (b.prompt_ids, b.responses_ids)
    assert torch.equal(a.pixels["pixel_values"], b.pixels["pixel_values"])
    assert a.images_sha256 == b.images_sha256 != ""


def test_images_without_placeholders_go_where_trl_puts_them(tmp_path):
    """TRL's own example shape: string message content beside ``images``; the images open the first user turn."""
    (tmp_path / "a.png").write_bytes(png(COLOURS[0]))
    processor = tiny_vision("tiny-random-llava")[1]
    parts = write_rows(tmp_path, [trl_row("a.png", "What colour?", "Red.", "Blue.")], "parts.jsonl")
    strings = write_rows(tmp_path, [{"images": ["a.png"], "prompt": [{"role": "user", "content": "What colour?"}],
                                     "chosen": [{"role": "assistant", "content": "Red."}],
                                     "rejected": [{"role": "assistant", "content": "Blue."}]}], "strings.jsonl")
    (a,), _ = load_vision(str(parts), processor, DATA)
    (b,), _ = load_vision(str(strings), processor, DATA)
    assert (a.prompt_ids, a.responses_ids) == (b.prompt_ids, b.responses_ids)


def test_placeholders_must_match_images_with_one_line(tmp_path):
    (tmp_path / "a.png").write_bytes(png(COLOURS[0]))
    processor = tiny_vision("tiny-random-llava")[1]
    good = trl_row("a.png", "Q?", "Yes.", "No.")
    two = {**good, "images": ["a.png", "a.png"]}
    path = write_rows(tmp_path, [good, two])
    with pytest.raises(DataError) as err:
        load_vision(str(path), processor, DATA)
    message = str(err.value)
    assert message.startswith(f"{path}:2: 1 image placeholder(s)") and "2 image(s)" in message
    assert "\n" not in message
    in_response = {**good, "chosen": [{"role": "assistant", "content": [{"type": "image"}]}], "images": ["a.png"]}
    with pytest.raises(DataError, match=r":1: .*image part in a response|:1: 1 image placeholder"):
        load_vision(str(write_rows(tmp_path, [in_response], "r.jsonl")), processor, DATA)


def test_bad_images_are_dropped_and_counted_by_reason(tmp_path):
    good = png(COLOURS[0])
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    (tmp_path / "cut.png").write_bytes(png(COLOURS[1], (64, 64))[:60])
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # 25 Mpx, a few kB: refused from its header
    (tmp_path / "huge.png").write_bytes(buffer.getvalue())
    rows = [trl_row(name, f"Q{i}?", "Yes.", "No.")
            for i, name in enumerate(["good.png", "text.png", "cut.png", "huge.png", "missing.png"])]
    groups, report = load_vision(str(write_rows(tmp_path, rows)), tiny_vision("tiny-random-llava")[1], DATA)
    assert len(groups) == 1 and groups[0].location.endswith(":1")
    assert report.rows_read == 5 == report.rows_kept + report.rows_dropped
    assert report.dropped == {"image_unreadable": 2, "image_truncated": 1, "image_too_large": 1}


def test_image_sources_outside_the_data_folder_are_refused(tmp_path):
    processor = tiny_vision("tiny-random-llava")[1]
    for name, what in (("https://example.com/a.png", "is a URL"), ("/etc/hostname", "relative"),
                       ("../a.png", "leaves the data file's folder")):
        path = write_rows(tmp_path, [trl_row(name, "Q?", "Yes.", "No.")], "x.jsonl")
        with pytest.raises(DataError, match=what) as err:
            load_vision(str(path), processor, DATA)
        assert str(err.value).startswith(f"{path}:1: 'images[0]'")
    skip = DataConfig(max_length=96, max_prompt_length=64, on_error="skip", max_bad_fraction=1.0)
    (tmp_path / "a.png").write_bytes(png(COLOURS[0]))
    rows = [trl_row("a.png", "Q?", "Yes.", "No."), trl_row("../a.png", "R?", "Yes.", "No.")]
    _, report = load_vision(str(write_rows(tmp_path, rows, "y.jsonl")), processor, skip)
    assert report.dropped == {"image_source": 1} and report.rows_kept == 1


def test_image_prompt_longer_than_max_prompt_length_is_dropped_not_cut(tmp_path):
    processor = tiny_vision("tiny-random-llava")[1]
    path = colour_pairs(tmp_path, 2)
    data = DataConfig(max_length=96, max_prompt_length=20)  # under the 16 image tokens + the chat frame
    groups, report = load_vision(str(path), processor, data)
    assert groups == [] and report.dropped == {"image_prompt_too_long": 2}
    # Responses are still cut as text responses are: the image stays whole.
    (whole, *_), _ = load_vision(str(path), processor, DATA)
    n = len(whole.prompt_ids)
    assert len(whole.chosen_ids) > 2
    short = DataConfig(max_length=n + 2, max_prompt_length=n)
    groups, report = load_vision(str(path), processor, short)
    assert report.truncated == 2 and all(len(g.chosen_ids) == 2 for g in groups)
    assert all(g.prompt_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 16 for g in groups)


def test_duplicates_compare_the_images_too(tmp_path):
    (tmp_path / "a.png").write_bytes(png(COLOURS[0]))
    (tmp_path / "b.png").write_bytes(png(COLOURS[1]))
    rows = [trl_row("a.png", "Q?", "Yes.", "No."), trl_row("b.png", "Q?", "Yes.", "No."),
            trl_row("a.png", "Q?", "Yes.", "No.")]
    groups, report = load_vision(str(write_rows(tmp_path, rows)), tiny_vision("tiny-random-llava")[1], DATA)
    assert len(groups) == 2 and report.dropped == {"duplicate": 1}


def test_a_text_model_refuses_image_rows_in_one_line(tmp_path):
    path = colour_pairs(tmp_path, 2)
    cfg = {"model": {"name_or_path": "tiny-random-llama"}, "data": {"train": str(path), "cache": False},
           "train": {"max_steps": 1, "progress": False}}
    with pytest.raises(DpokitError, match=r"prefs.jsonl:1: a row with images; .*vision-language model"):
        dpokit.train(cfg, run_dir=str(tmp_path / "run"))


def test_parquet_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = trl_row("unused", "What colour?", "Red.", "Blue.")
    row["images"] = [{"bytes": png(COLOURS[0]), "path": "red.png"}]
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "p.parquet")
    (tmp_path / "red.png").write_bytes(png(COLOURS[0]))
    processor = tiny_vision("tiny-random-llava")[1]
    (a,), report = load_vision(str(tmp_path / "p.parquet"), processor, DATA)
    (b,), _ = load_vision(str(write_rows(tmp_path, [trl_row("red.png", "What colour?", "Red.", "Blue.")])),
                          processor, DATA)
    assert a.images_sha256 == b.images_sha256 and torch.equal(a.pixels["pixel_values"], b.pixels["pixel_values"])


def test_image_parts_round_trip():
    messages = [{"role": "user", "content": f"{IMAGE_MARK}Look{IMAGE_MARK} here"}]
    assert as_parts(messages)[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Look"},
                                                {"type": "image"}, {"type": "text", "text": " here"}]


def test_pixels_follow_the_rows_of_a_padded_batch(tmp_path):
    """Each response is a row of its own: it gets its group's images, and a group without images none (LLaVA)
    or zero images (Idefics3, whose pixel inputs are per row)."""
    (tmp_path / "a.png").write_bytes(png(COLOURS[0]))
    rows = [trl_row(["a.png", "a.png"], "Two?", "Yes.", "No."),
            {"images": [], "prompt": [{"role": "user", "content": [{"type": "text", "text": "None?"}]}],
             "chosen": "Yes.", "rejected": "No."}]
    path = write_rows(tmp_path, rows)
    llava, _ = load_vision(str(path), tiny_vision("tiny-random-llava")[1], DATA)
    assert collate_pixels(llava)["pixel_values"].shape[0] == 4  # 2 images x 2 responses, none for the other
    idefics, _ = load_vision(str(path), tiny_vision("tiny-random-idefics3")[1], DATA)
    pixels = collate_pixels(idefics)
    assert pixels["pixel_values"].shape[:2] == (4, 2)  # 4 rows, up to 2 images each
    assert pixels["pixel_values"][2:].abs().sum() == 0 and pixels["pixel_attention_mask"][2:].sum() == 0


# ---------------------------------------------------------------------------------------------------- models

def test_freeze_vision_and_lora_on_the_language_model_only(tmp_path):
    from dpokit.models.loading import load_models

    cfg = load_config({"model": {"name_or_path": "tiny-random-llava", "lora": {"r": 4}}})
    models = load_models(cfg.model, reference="never")
    trainable = [n for n, p in models.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    full = load_models(load_config({"model": {"name_or_path": "tiny-random-idefics3"}}).model, reference="never")
    names = {n: p.requires_grad for n, p in full.policy.named_parameters()}
    assert not any(v for n, v in names.items() if ".vision_model." in n)
    assert all(v for n, v in names.items() if ".connector." in n or ".text_model." in n)
    thawed = load_config({"model": {"name_or_path": "tiny-random-idefics3", "freeze_vision": False}})
    assert all(p.requires_grad for p in load_models(thawed.model, reference="never").policy.parameters())


def test_a_vision_model_loads_from_a_folder(tmp_path):
    from dpokit.models.loading import load_models

    model, processor = tiny_vision("tiny-random-llava")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    models = load_models(load_config({"model": {"name_or_path": str(tmp_path / "m")}}).model, reference="never")
    assert type(models.policy).__name__ == "LlavaForConditionalGeneration"
    assert models.processor is not None and models.tokenizer is models.processor.tokenizer
    for a, b in zip(model.state_dict().values(), models.policy.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_see_the_images_and_the_fast_path_equals_full_logits(tmp_path, family):
    from dpokit.data.batch import collate_tokenized
    from dpokit.models.logprobs import batch_logps

    model, processor = tiny_vision(family)
    groups, _ = load_vision(str(colour_pairs(tmp_path, 4)), processor, DATA)
    batch = collate_tokenized(groups, processor.tokenizer.pad_token_id, layout="padded")
    with torch.no_grad():
        fast, n_fast = batch_logps(model, batch)
        plain, n_plain = batch_logps(model, batch, plain=True)
        blank = {**batch, "pixels": {k: v.roll(2, dims=0) if v.is_floating_point() else v
                                     for k, v in batch["pixels"].items()}}
        other, _ = batch_logps(model, blank)  # another group's images
    assert torch.equal(n_fast, n_plain)
    # The same sums of the same fp32 log-softmaxes, the head applied to fewer rows: per response ~30 terms of
    # size <= 10, so 1e-4 absolute is ~30 EPS32-sized roundings with room; images changing is >> that.
    assert torch.allclose(fast, plain, atol=1e-4, rtol=0)
    assert (fast - other).abs().max() > 1e-3


def test_packed_layout_and_the_reference_store_are_refused_for_images(tmp_path):
    path = colour_pairs(tmp_path, 2)
    base = {"model": {"name_or_path": "tiny-random-llava"}, "data": {"train": str(path), "max_length": 96,
                                                                     "max_prompt_length": 64},
            "train": {"max_steps": 1, "progress": False}}
    for change, what in ((("train", "layout", "packed"), "train.layout: packed is not supported for image data"),
                         (("reference", "mode", "store"), "reference.mode: store keys reference log-probs"),
                         (("loss", "name", "kto"), "only offline DPO")):
        cfg = json.loads(json.dumps(base))
        cfg.setdefault(change[0], {})[change[1]] = change[2]
        with pytest.raises(DpokitError, match=what) as err:
            dpokit.train(cfg, run_dir=str(tmp_path / "run"))
        assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------------------------- training

LR, STEPS = 1e-3, 3


def vision_config(path: Path, family: str = "tiny-random-llava", **train) -> dict:
    return {"model": {"name_or_path": family},
            "data": {"train": str(path), "max_length": 96, "max_prompt_length": 64},
            "loss": {"name": "sigmoid", "beta": 0.1},
            "train": {"lr": LR, "max_steps": STEPS, "seed": 3, "progress": False, "layout": "padded", **train}}


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_2_equals_batch_1_with_accumulation_2(tmp_path, family):
    path = colour_pairs(tmp_path, 6)
    big = dpokit.train(vision_config(path, family, batch_size=2, grad_accum=1), run_dir=str(tmp_path / "big"))
    small = dpokit.train(vision_config(path, family, batch_size=1, grad_accum=2), run_dir=str(tmp_path / "small"))
    rows_big, rows_small = train_rows(big), train_rows(small)
    assert [r["tokens"] for r in rows_big] == [r["tokens"] for r in rows_small]
    # fp32 round-off only (tolerances.py): the same pairs, summed in another order.
    assert_same_metrics(rows_big, rows_small, ("loss", "grad_norm", "rewards/margins", "logps/chosen"))
    # pi == pi_ref at step 1 (the same weights, the same computation): every margin is 0 and the loss is
    # -log sigmoid(0) = ln 2 rounded to fp32 (3e-8 away); 1e-6 is the fp32 mean of 2 equal terms with room.
    assert rows_big[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    w_big, w_small = weights(big), weights(small)
    assert_same_weights_after_adamw(w_big, w_small, LR, STEPS)
    untrained = dpokit.train(vision_config(path, family, lr=1e-12, max_steps=1), run_dir=str(tmp_path / "u"))
    w0 = weights(untrained)
    assert max((w_big[k] - w0[k]).abs().max().item() for k in w_big) > LR  # training moved the weights


def test_trains_from_a_datasets_dataset_as_from_the_file(tmp_path):
    import datasets

    path = colour_pairs(tmp_path, 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "chosen": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "rejected": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]})
    for row in rows:
        row["images"] = [Image.open(tmp_path / name) for name in row["images"]]
        for key in ("prompt", "chosen", "rejected"):  # datasets fills absent struct fields with None
            for message in row[key]:
                message["content"] = [{"type": p["type"], "text": p.get("text")} for p in message["content"]]
    dataset = datasets.Dataset.from_list(rows, features=features)
    assert type(dataset[0]["images"][0]).__module__.startswith("PIL.")
    from_file = dpokit.train(vision_config(path), run_dir=str(tmp_path / "file"))
    from_memory = dpokit.train(vision_config(Path("unused")), run_dir=str(tmp_path / "memory"), train_data=dataset)
    assert_same_metrics(train_rows(from_file), train_rows(from_memory), ("loss", "grad_norm", "logps/chosen"))
    report = json.loads((tmp_path / "memory" / "data_report.json").read_text())["train"]
    assert report["rows_kept"] == 4


def test_shipped_vision_config_trains_via_the_cli(tmp_path):
    from conftest import run_cli

    run = tmp_path / "run"
    result = run_cli("train", "configs/tiny-vision.yaml", f"run_dir={run}", "train.progress=false",
                     "train.max_steps=4", "eval.every=2")
    assert result.returncode == 0, result.stderr
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert any(r["split"] == "eval" for r in rows)
    final = run / "final"
    assert (final / "processor_config.json").is_file() and (final / "model.safetensors").is_file()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert type(AutoModelForImageTextToText.from_pretrained(final)).__name__ == "LlavaForConditionalGeneration"
    assert AutoProcessor.from_pretrained(final).tokenizer.convert_tokens_to_ids("<image>") == 512
    # The model card says what it is and its quick start runs as written: an image and a question through
    # transformers' image-text-to-text pipeline (the text pipeline would refuse this model).
    card = (final / "README.md").read_text()
    assert front_matter(card)["pipeline_tag"] == "image-text-to-text"
    (snippet,) = re.findall(r"## Use\n\n```python\n(.*?)```", card, flags=re.S)
    image = tmp_path / "shape.png"
    image.write_bytes(png(COLOURS[1]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet.replace("PATH_OR_HUB_ID", str(final)).replace("IMAGE_PATH", str(image)), {})
    assert printed.getvalue()  # the snippet ran to its print (a random model's answer may be empty)


def test_base64_images_in_memory_rows(tmp_path):
    row = trl_row({"bytes": base64.b64encode(png(COLOURS[2])).decode()}, "Q?", "Yes.", "No.")
    groups, _ = load_vision(str(write_rows(tmp_path, [row])), tiny_vision("tiny-random-llava")[1], DATA)
    assert len(groups) == 1 and groups[0].pixels["pixel_values"].shape == (1, 3, 16, 16)


def test_data_check_reports_images(tmp_path):
    from conftest import run_cli

    result = run_cli("data", "check", str(colour_pairs(tmp_path, 4)), "--model", "tiny-random-idefics3", "--show", "1")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # the console wraps long lines
    assert "images: 4 in kept rows, 1-1 per row (mean 1.0); width 24-24 px, height 20-20 px" in text
    assert "<fake_token_around_image><global-img><image>" in text


def test_lora_with_the_adapter_reference_trains(tmp_path):
    path = colour_pairs(tmp_path, 4)
    cfg = vision_config(path, "tiny-random-idefics3", batch_size=2, lr=1e-2)
    cfg["model"]["lora"] = {"r": 4}
    cfg["reference"] = {"mode": "adapter"}
    rows = train_rows(dpokit.train(cfg, run_dir=str(tmp_path / "run")))
    # The adapter-disabled policy is the reference: LoRA's B starts at zero, so step 1 is exactly ln 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] != rows[0]["loss"]
    assert (tmp_path / "run" / "final" / "adapter").is_dir()
    # Both cards load the adapter's base with its own class, not as a causal language model.
    for card in (tmp_path / "run" / "final" / "README.md", tmp_path / "run" / "final" / "adapter" / "README.md"):
        text = card.read_text()
        assert "AutoModelForImageTextToText" in text and "AutoModelForCausalLM" not in text


@pytest.mark.equivalence
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    import subprocess
    import sys
    import time

    import yaml

    from conftest import ROOT, run_cli

    cfg = vision_config(colour_pairs(tmp_path, 8), batch_size=2, max_steps=6, save_every=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli("train", str(path), f"run_dir={straight}").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", "train", str(path), f"run_dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, end = killed / "checkpoints", time.time() + 240
    while proc.poll() is None and time.time() < end:
        if ckpts.is_dir() and len([p for p in ckpts.iterdir() if (p / "COMPLETE").exists()]) >= 2:
            proc.kill()  # SIGKILL: no handler runs
            break
        time.sleep(0.005)
    assert proc.wait() != 0, "the run ended before it could be killed"
    done = run_cli("train", str(path), f"run_dir={killed}", "--resume")
    assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-2000:]
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 7))


@pytest.mark.parametrize("loss", ["ipo", "hinge", "simpo", "apo_zero", "nca_pair", "sppo_hard", "aot"])
def test_losses_on_sequence_log_probs_take_image_batches_unchanged(tmp_path, loss):
    """Each loss sees only the sequence log-probs: on an image batch its per-pair losses are its function of the
    policy's and reference's log-probs computed by the one log-prob path, and its gradient reaches the
    projector (the images' way into the language model)."""
    import contextlib

    from dpokit.data.batch import collate_tokenized, regroup
    from dpokit.losses import compute_loss
    from dpokit.methods.dpo import pair_forward
    from dpokit.models.logprobs import batch_logps
    from dpokit.training.distributed import LogpsModule
    from dpokit.training.reference import FrozenReference

    model, processor = tiny_vision("tiny-random-llava")
    reference = tiny_vision("tiny-random-llava", seed=1)[0]
    groups, _ = load_vision(str(colour_pairs(tmp_path, 4)), processor, DATA)
    batch = collate_tokenized(groups, processor.tokenizer.pad_token_id, layout="padded")
    cfg = load_config({"loss": {"name": loss}})
    out = pair_forward(LogpsModule(model), FrozenReference(reference), batch, groups, cfg, contextlib.nullcontext)
    with torch.no_grad():
        policy, n_tokens = (regroup(x, batch) for x in batch_logps(model, batch))
        ref = regroup(batch_logps(reference, batch)[0], batch)
        expected, _, _ = compute_loss(cfg.loss, policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                      n_tokens[:, 0], n_tokens[:, 1])
    assert torch.allclose(out["losses"].detach(), expected, rtol=1e-6, atol=1e-6)  # the same fp32 calls
    out["losses"].sum().backward()
    projector = model.model.multi_modal_projector.linear_1.weight.grad
    assert projector is not None and projector.abs().sum() > 0


def test_commands_that_take_text_models_only_refuse_a_vision_model(tmp_path):
    """score, eval, serve and export load through the text loaders: a vision-language model there is one line,
    never the tiny text model or a causal LM without its image encoder."""
    from dpokit.errors import ModelError
    from dpokit.models.loading import load_model, load_tokenizer, resolve

    model, processor = tiny_vision("tiny-random-idefics3")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    for name in ("tiny-random-llava", str(tmp_path / "m")):
        for load in (load_model, load_tokenizer):
            with pytest.raises(ModelError, match="a vision-language model; only dpokit train takes one so far"):
                load(resolve(name))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "Hi?", "response": "Yes."}) + "\n")
    from conftest import run_cli

    result = run_cli("score", "--model", str(tmp_path / "m"), "--ref", str(tmp_path / "m"), str(tmp_path / "rows.jsonl"))
    assert result.returncode != 0 and "a vision-language model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.equivalence
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_ddp_ranks_equal_one_rank(tmp_path):
    """2 ranks x batch 2 == 1 rank x batch 4 on image pairs, with an uneven last step (7 pairs: 4, 3)."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import ROOT

    path = colour_pairs(tmp_path, 7)
    one = dpokit.train(vision_config(path, batch_size=4, max_steps=None, epochs=1), run_dir=str(tmp_path / "one"))
    cfg = vision_config(path, batch_size=2, max_steps=None, epochs=1)
    cfg["distributed"] = {"strategy": "ddp", "timeout_s": 60}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "dpokit", "train", "--nproc", "2", str(tmp_path / "ddp.yaml"),
                           f"run_dir={tmp_path / 'two'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows_one, rows_two = train_rows(one), train_rows(tmp_path / "two")
    assert len(rows_one) == 2 and [r["tokens"] for r in rows_one] == [r["tokens"] for r in rows_two]
    # gloo adds the ranks' partial sums: another summation order of the same fp32 terms (tolerances.py).
    assert_same_metrics(rows_one, rows_two, ("loss", "grad_norm", "rewards/margins", "logps/chosen"))
    assert_same_weights_after_adamw(weights(one), weights(tmp_path / "two"), LR, 2)
