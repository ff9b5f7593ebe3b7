"""``dpokit serve`` on a vision-language run, both tiny families (LLaVA, Idefics3): a request with an image
samples pi_ref and pi with its pixel inputs (what ``generate`` samples), each column's implicit rewards are what
training's reader and scorer compute for the same prompt, image and text, the image matters, every bad image or
image prompt is a 4xx naming the field, the page's info and picker, and the OpenAI API's ``image_url`` parts."""

import base64
import io
import json
import re
import signal
import struct
import threading
import urllib.error
import urllib.request
import zlib

import pytest
import torch
from PIL import Image

from conftest import chromium, close_chromium, serve_command
from dpokit.data.vision import load_vision
from dpokit.evaluate.scoring import score_rows
from dpokit.models.generate import SamplingParams, generate
from dpokit.serve.app import create_app, start_in_thread
from dpokit.serve.engine import BadRequest, Limits, load_playground
from test_vision import COLOURS, png, trl_row, write_rows
from test_vision_eval import FAMILIES, vision_run

QUESTION = "What colour is the shape?"
MAX_IMAGE_BYTES = 8 * 1024
"""The fixtures' per-image limit: small, so an oversized image is cheap to make (a 64 x 64 noise PNG)."""


def url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def noise_png(size: int = 64) -> bytes:
    """A PNG that does not compress: 64 x 64 random pixels are ~12 KiB, over MAX_IMAGE_BYTES (the shipped-style
    PNGs, one colour, are ~100 bytes)."""
    image = Image.frombytes("RGB", (size, size), torch.randint(0, 256, (size * size * 3,),
                                                               generator=torch.Generator().manual_seed(0),
                                                               dtype=torch.uint8).numpy().tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_header_png() -> bytes:
    """A small PNG whose header says 5000 x 5000 pixels (over the 4096 x 4096 limit), its CRC fixed."""
    data = bytearray(png(COLOURS[0]))
    ihdr = 8 + 4  # signature, chunk length
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", 5000, 5000)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tmp_path_factory):
    return vision_run(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def playground(run):
    return load_playground(run, limits=Limits(max_image_bytes=MAX_IMAGE_BYTES), precision="fp32")


@pytest.fixture(scope="module")
def server(playground):
    with start_in_thread(create_app(playground, api=True)) as running:
        yield running


def post(server_url: str, body: dict | bytes, path: str = "/api/generate") -> tuple[int, list | dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server_url.rstrip("/") + path, data=data,
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw, status = response.read().decode(), response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(), exc.code
    if status == 200 and path == "/api/generate":
        return status, [json.loads(line) for line in raw.splitlines()]
    return status, json.loads(raw)


def job(playground, body: dict) -> dict[str, dict]:
    """Run a request on the engine: the ``final`` event of each column."""
    events: list[dict] = []
    playground.run(playground.prepare(body), events.append, threading.Event())
    assert events[-1]["type"] == "final" and not [e for e in events if e["type"] == "error"]
    return {e["side"]: e for e in events if e["type"] == "final"}


# ------------------------------------------------------------------------------------------------- the engine

def test_both_columns_sample_with_the_image_as_generate_does(playground):
    """Each column is what ``generate`` samples from that model for the image prompt at the seed."""
    body = {"prompt": QUESTION, "images": [url(png(COLOURS[0]))], "n_samples": 3, "max_new_tokens": 6, "seed": 3}
    request = playground.prepare(body)
    image_prompt = request.image_prompt
    assert image_prompt is not None and len(image_prompt.images) == 1 and image_prompt.pixels
    finals = job(playground, body)
    scorer = playground.scorer
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, batch_size=3)
    for side, model in (("reference", scorer.reference), ("policy", scorer.policy)):
        samples = generate(model, scorer.tokenizer, [request.prompt_ids] * 3, params,
                           pixels=[image_prompt.pixels] * 3)
        assert [s["text"] for s in finals[side]["samples"]] == [s.text for s in samples]
        assert all(s["implicit_reward"] is not None for s in finals[side]["samples"])


def test_rewards_equal_training_reader_and_scorer_for_the_same_prompt_image_and_text(playground, tmp_path):
    """The page's implicit reward of a text is what the training reader (``load_vision``, the reader of
    ``dpokit score`` / ``eval`` for image rows) and ``Scorer.implicit_rewards`` give the same row: the same ids,
    the same pixel inputs, the same batches, so the same numbers to the bit."""
    (tmp_path / "red.png").write_bytes(png(COLOURS[0]))
    texts = ["It is red.", "A triangle, I think.", "It is blue and quite small."]
    request = playground.prepare({"prompt": QUESTION, "images": [url(png(COLOURS[0]))]})
    shown = playground.vision.score(request.image_prompt, texts)
    rows = [trl_row("red.png", QUESTION, text, "Something else entirely.") for text in texts]
    groups, report = load_vision(str(write_rows(tmp_path, rows)), playground.scorer.processor,
                                 playground.scorer.config.data)
    assert report.rows_kept == 3
    assert all(g.prompt_ids == request.prompt_ids for g in groups)
    scores = playground.scorer.implicit_rewards([g.prompt_ids for g in groups], [g.chosen_ids for g in groups],
                                                [g.pixels for g in groups])
    assert [s["reward"] for s in shown] == scores["rewards"].tolist()
    assert [s["policy_logp"] for s in shown] == scores["policy_logps"].tolist()
    assert [s["ref_logp"] for s in shown] == scores["ref_logps"].tolist()
    assert len(set(s["reward"] for s in shown)) == 3  # three texts, three rewards: nothing constant
    # dpokit score on the same prompt, image and texts (the plain row shape) prints the same numbers.
    printed = score_rows(playground.scorer, [{"image": "red.png", "prompt": QUESTION, "response": text}
                                             for text in texts], base=tmp_path)
    assert [r["reward"] for r in printed] == [s["reward"] for s in shown]


def test_the_image_changes_the_policy_samples_or_scores(playground):
    body = {"prompt": QUESTION, "n_samples": 2, "max_new_tokens": 6, "seed": 1}
    red = job(playground, {**body, "images": [url(png(COLOURS[0]))]})["policy"]["samples"]
    blue = job(playground, {**body, "images": [url(png(COLOURS[2]))]})["policy"]["samples"]
    assert [(s["text"], s["implicit_reward"]) for s in red] != [(s["text"], s["implicit_reward"]) for s in blue]
    # The same text is scored differently with another image: the reward reads the pixels.
    request = {name: playground.prepare({"prompt": QUESTION, "images": [url(png(COLOURS[c]))]})
               for name, c in (("red", 0), ("blue", 2))}
    rewards = {name: playground.vision.score(r.image_prompt, ["It is red."])[0]["reward"]
               for name, r in request.items()}
    assert rewards["red"] != rewards["blue"]


def test_image_placement_follows_the_training_rows(playground):
    """No image part: the images go before the text of the first user message, as for a training row; an
    explicit part puts it where it stands."""
    image = url(png(COLOURS[1]))
    implicit = playground.prepare({"prompt": QUESTION, "images": [image]})
    explicit = playground.prepare({"prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION}]}], "images": [image]})
    after = playground.prepare({"prompt": [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image"}]}], "images": [image]})
    assert implicit.prompt_ids == explicit.prompt_ids != after.prompt_ids
    two = playground.prepare({"prompt": QUESTION, "images": [image, url(png(COLOURS[2]))]})
    assert len(two.image_prompt.images) == 2 and len(two.prompt_ids) > len(implicit.prompt_ids)


BAD = [
    ({"prompt": "x", "images": ["https://example.com/cat.png"]}, 422, "images[0]: a URL; dpokit serve fetches nothing"),
    ({"prompt": "x", "images": [base64.b64encode(b"just some text").decode()]}, 415,
     "images[0]: not a PNG, JPEG, WebP or GIF image"),
    ({"prompt": "x", "images": ["data:image/bmp;base64,Qk0="]}, 415, "images[0]: image/bmp; send a PNG"),
    ({"prompt": "x", "images": [url(png(COLOURS[0]), "image/jpeg")]}, 415, "says image/jpeg but holds a PNG"),
    ({"prompt": "x", "images": ["data:image/png;base64,%%%"]}, 422, "images[0]: not base64 text"),
    ({"prompt": "x", "images": [url(noise_png())]}, 413, f"; at most {MAX_IMAGE_BYTES} bytes"),
    ({"prompt": "x", "images": [url(huge_header_png())]}, 413, "images[0]: more than 16777216 pixels"),
    ({"prompt": "x", "images": [url(png(COLOURS[1], (64, 64))[:60])]}, 422, "images[0]: the image data ends early"),
    ({"prompt": "x", "images": [url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)]}, 422, "images[0]: cannot be read"),
    ({"prompt": "x", "images": [url(png(COLOURS[0]))] * 3}, 413, "images: 3 images; at most 2"),
    ({"prompt": "x", "images": "abc"}, 422, "images: expected a list of images"),
    ({"prompt": "x", "images": [7]}, 422, "images[0]: expected a data: URL"),
    ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}],
      "images": [url(png(COLOURS[0]))]}, 422, "images: 2 image placeholder(s)"),
    ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]}, 422,
     "images: 1 image placeholder(s) ({\"type\": \"image\"}) in the prompt but 0 image(s)"),
    ({"prompt": [{"role": "user", "content": [{"type": "video"}]}], "images": []}, 422,
     "'prompt[0].content[0]' must be {'type': 'image'} or"),
    ({"prompt": "red \ue000", "images": [url(png(COLOURS[0]))]}, 422, "'prompt' holds U+E000"),
    ({"prompt": " ".join(["colour"] * 80), "images": [url(png(COLOURS[0]))]}, 422,
     "prompt: with its image tokens longer than 64 tokens"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[m[:32] for _, _, m in BAD])
def test_bad_images_get_a_4xx_naming_the_field(server, body, status, message):
    got, answer = post(server.url, body)
    assert got == status and message in answer["error"], answer


def test_malformed_prompts_of_a_vision_run_get_a_4xx_and_the_server_keeps_serving(server):
    for body in (b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b', "images": []}',
                 b'{"prompt": [[{"role": "user", "content": "x"}]]}', b'{"prompt": [{"role": "user"}]}',
                 b'{"prompt": [{"role": "user", "content": [{"type": "image"}]}], "images": null}'):
        status, answer = post(server.url, body)
        assert 400 <= status < 500 and answer["error"], answer
    status, events = post(server.url, {"prompt": QUESTION, "images": [url(png(COLOURS[0]))], "n_samples": 1,
                                       "max_new_tokens": 2})
    assert status == 200 and events[-1]["type"] == "done"


def test_the_body_limit_grows_for_a_vision_run_only(server, playground, tiny_chat_run):
    limits = playground.limits
    assert playground.info()["limits"]["max_body_bytes"] == limits.body_bytes(True) > limits.body_bytes(False)
    assert Limits().body_bytes(True) < 6 * 1024 * 1024  # the default bound: 64 KiB + 2 base64 images of 2 MiB
    status, answer = post(server.url, b'{"prompt": "' + b"a" * limits.body_bytes(True) + b'"}')
    assert status == 413 and "request too large" in answer["error"]
    text_run = load_playground(tiny_chat_run)
    assert text_run.info()["images"] is None and text_run.info()["limits"]["max_body_bytes"] == 64 * 1024


def test_a_text_run_refuses_images_in_one_line(tiny_chat_run):
    text_run = load_playground(tiny_chat_run)
    for body, message in (({"prompt": "Hi", "images": [url(png(COLOURS[0]))]}, "images: this run's model reads text"),
                          ({"prompt": "Hi", "images": []}, "images: this run's model reads text only"),
                          ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]},
                           "prompt: has an image part")):
        with pytest.raises(BadRequest, match=re.escape(message)) as caught:
            text_run.prepare(body)
        assert caught.value.status == 422


# ---------------------------------------------------------------------------------------------------- HTTP

def test_http_request_with_an_image_streams_both_columns(server, playground):
    with urllib.request.urlopen(server.url + "api/info", timeout=30) as response:
        info = json.loads(response.read())
    assert info["images"] == {"max_images": 2, "max_image_bytes": MAX_IMAGE_BYTES,
                              "types": ["image/png", "image/jpeg", "image/webp", "image/gif"]}
    # Examples come from the run's held-out rows, their images with them.
    assert info["examples"] and all(e["images"][0].startswith("data:image/png;base64,") for e in info["examples"])
    example = info["examples"][0]
    body = {"prompt": example["prompt"], "images": example["images"], "n_samples": 2, "max_new_tokens": 5}
    status, events = post(server.url, body)
    assert status == 200 and events[-1]["type"] == "done"
    finals = {e["side"]: e for e in events if e["type"] == "final"}
    assert sorted(finals) == ["policy", "reference"]
    direct = job(playground, body)
    for side in finals:
        assert finals[side]["samples"] == direct[side]["samples"]  # the engine's answer, over HTTP


def test_openai_chat_with_an_image_url_part_equals_generate(server, playground):
    image = url(png(COLOURS[3]))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": QUESTION}]}]
    status, body = post(server.url, {"model": "policy", "messages": messages, "max_tokens": 6, "seed": 4, "n": 2},
                        "/v1/chat/completions")
    assert status == 200, body
    request = playground.prepare({"prompt": QUESTION, "images": [image]})  # the page's prompt: the same ids
    assert body["usage"]["prompt_tokens"] == len(request.prompt_ids)
    samples = generate(playground.scorer.policy, playground.scorer.tokenizer, [request.prompt_ids] * 2,
                       SamplingParams(max_new_tokens=6, seed=4, batch_size=2),
                       pixels=[request.image_prompt.pixels] * 2)
    assert [c["message"]["content"] for c in body["choices"]] == [s.text for s in samples]
    for part, status_code, message in (
            ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, 400, "fetches nothing"),
            ({"type": "image_url", "image_url": {"url": image, "detail": "high"}}, 400, "detail: only"),
            ({"type": "image_url", "image_url": {"url": url(b"text")}}, 415, "not a PNG, JPEG")):
        status, answer = post(server.url, {"model": "policy", "messages": [{"role": "user", "content": [part]}]},
                              "/v1/chat/completions")
        assert status == status_code and message in answer["error"]["message"], answer
        assert answer["error"]["param"] == "messages[0].content[0]"


def test_openai_api_of_a_text_run_refuses_image_parts(tiny_chat_run):
    with start_in_thread(create_app(load_playground(tiny_chat_run), api=True)) as running:
        content = [{"type": "image_url", "image_url": {"url": url(png(COLOURS[0]))}}, {"type": "text", "text": "Hi"}]
        status, answer = post(running.url, {"model": "policy", "messages": [{"role": "user", "content": content}]},
                              "/v1/chat/completions")
    assert status == 400 and "messages[0].content[0]: an image, but this run's model reads text only" in \
        answer["error"]["message"]


def test_dpokit_serve_command_takes_an_image(run):
    with serve_command(run, pattern=r"http://127\.0\.0\.1:\d+/") as (process, server_url):
        status, events = post(server_url, {"prompt": QUESTION, "images": [url(png(COLOURS[0]))],
                                           "max_new_tokens": 3, "n_samples": 1})
        assert status == 200 and events[-1]["type"] == "done"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0


# ---------------------------------------------------------------------------------------------------- page

def test_page_has_an_image_picker_for_a_vision_run_only(server, tiny_chat_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(script):
        return WebDriverWait(driver, 120, poll_frequency=0.05).until(lambda d: d.execute_script(script))

    image = tmp_path / "green.png"
    image.write_bytes(png(COLOURS[1], (30, 20)))
    (tmp_path / "big.png").write_bytes(noise_png())
    driver, profile = chromium("MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "1280,1100")
    try:
        driver.get(server.url)
        wait("return document.body.dataset.ready === '1'")
        assert driver.find_element(By.ID, "image-box").is_displayed()
        picker = driver.find_element(By.ID, "image-input")
        picker.send_keys(str(tmp_path / "big.png"))  # over the limit: refused on the page, nothing attached
        wait("return document.getElementById('error').textContent.includes('big.png is')")
        picker.send_keys(str(image))
        wait("return document.querySelector('.thumb .size') && "
             "document.querySelector('.thumb .size').textContent.startsWith('30×20')")
        driver.find_element(By.ID, "prompt").send_keys(QUESTION)
        driver.find_element(By.ID, "run").click()
        assert wait("const s = document.body.dataset.state; return s === 'done' || s === 'error' ? s : null") \
            == "done", driver.find_element(By.ID, "error").text
        values = driver.execute_script(
            "return [...document.querySelectorAll('.badge.implicit')].map(b => b.dataset.value)")
        assert len(values) == 2 * 4 and all(v is not None for v in values)
        assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
        with start_in_thread(create_app(load_playground(tiny_chat_run))) as text_server:
            driver.get(text_server.url)
            wait("return document.body.dataset.ready === '1'")
            assert not driver.find_element(By.ID, "image-box").is_displayed()
    finally:
        close_chromium(driver, profile)

