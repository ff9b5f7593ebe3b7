"""``dpokit serve --api`` on a tiny run: OpenAI's /v1 routes answer raw HTTP and the ``openai`` client, their
samples equal ``generate`` (policy and reference alike), a stream reassembles to the whole answer, bad requests
get a 4xx in OpenAI's error shape, the token is required beyond loopback, and dpokit's own LLM judge can use it."""

import json
import signal
import urllib.error
import urllib.request

import pytest

from conftest import serve_command
from dpokit.models.generate import SamplingParams, encode_prompts, generate
from dpokit.rewards.judge import JUDGE_PROMPT, LLMJudge, parse_reply
from dpokit.serve.app import create_app, start_in_thread
from dpokit.serve.engine import load_playground
from dpokit.serve.openai_api import OpenAIApi

TOKEN = "a-long-enough-test-token-123"


@pytest.fixture(scope="module")
def playground(tiny_chat_run):
    return load_playground(tiny_chat_run)


@pytest.fixture(scope="module")
def api(playground):
    with start_in_thread(create_app(playground, api=True)) as running:
        yield running.url + "v1"


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, dict | bytes]:
    """(status, JSON) of a request; (status, raw bytes) of a stream."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw, status, kind = response.read(), response.status, response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        raw, status, kind = exc.read(), exc.code, exc.headers.get("content-type", "")
    return status, raw if kind.startswith("text/event-stream") else json.loads(raw)


def events(raw: bytes) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream, ``[DONE]`` as a string."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def reassemble(chunks: list, key: str) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content", "") if key == "delta" else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts


def expected(playground, side: str, prompt, params: SamplingParams, n: int = 1) -> list:
    """What ``generate`` samples from pi or pi_ref for the prompt (chat messages or text) at these settings."""
    scorer = playground.scorer
    model = scorer.policy if side == "policy" else scorer.reference
    context = OpenAIApi(playground).context
    ids = encode_prompts(scorer.tokenizer, [prompt], context + 1, context + 2)[0]
    return generate(model, scorer.tokenizer, [ids] * n, params), len(ids)


CHAT = [{"role": "user", "content": "Can you help me with task 7?"}]


def test_models_are_listed_and_unknown_ones_are_404(api):
    status, body = call(api + "/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["policy", "reference"]
    assert call(api + "/models/reference")[1]["id"] == "reference"
    status, body = call(api + "/models/gpt-4")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = call(api + "/chat/completions", {"model": "gpt-4", "messages": CHAT})
    assert status == 404 and body["error"]["param"] == "model"


@pytest.mark.parametrize("side", ["policy", "reference"])
def test_greedy_chat_equals_generate_and_the_stream_reassembles_to_it(api, playground, side):
    samples, prompt_tokens = expected(playground, side, CHAT, SamplingParams(max_new_tokens=12, temperature=0))
    status, body = call(api + "/chat/completions", {"model": side, "messages": CHAT, "temperature": 0,
                                                    "max_tokens": 12})
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == side
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": samples[0].text}
    assert choice["finish_reason"] == ("stop" if samples[0].finished else "length")
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(samples[0].response_ids),
                             "total_tokens": prompt_tokens + len(samples[0].response_ids)}

    status, raw = call(api + "/chat/completions", {"model": side, "messages": CHAT, "temperature": 0,
                                                   "max_tokens": 12, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    chunks = events(raw)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert reassemble(chunks[:-2], "delta") == {0: samples[0].text}
    assert chunks[-3]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"] == body["usage"]


def test_policy_and_reference_differ_so_the_model_name_matters(api):
    # Without this, the test above could pass with both names served by one model (greedy, the tiny models
    # agree: both repeat a newline; their samples at one seed differ).
    texts = {side: call(api + "/chat/completions", {"model": side, "messages": CHAT, "seed": 3,
                                                     "max_tokens": 32})[1]["choices"][0]["message"]["content"]
             for side in ("policy", "reference", "run")}
    assert texts["policy"] != texts["reference"] and texts["run"] == texts["policy"]


def test_sampled_choices_with_a_seed_equal_generate_streamed_or_not(api, playground):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, batch_size=3)
    samples, _ = expected(playground, "policy", "Once upon a time", params, n=3)
    request = {"model": "policy", "prompt": "Once upon a time", "max_tokens": 10, "top_p": 0.9, "seed": 7, "n": 3}
    status, body = call(api + "/completions", request)
    assert status == 200 and body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == [s.text for s in samples]
    assert len({s.text for s in samples}) > 1  # the choices are distinct draws, not one repeated
    status, raw = call(api + "/completions", {**request, "stream": True})
    chunks = events(raw)
    assert chunks[-1] == "[DONE]" and reassemble(chunks[:-1], "text") == dict(enumerate(s.text for s in samples))


def test_stop_strings_cut_the_text_before_them(api, playground):
    samples, _ = expected(playground, "policy", "Once upon a time", SamplingParams(max_new_tokens=24, temperature=0))
    text = samples[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip() and len(text) > 8
    request = {"model": "policy", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "stop": [stop]}
    body = call(api + "/completions", request)[1]
    assert body["choices"][0] == {"index": 0, "text": text[:text.find(stop)], "logprobs": None,
                                  "finish_reason": "stop"}
    chunks = events(call(api + "/completions", {**request, "stream": True})[1])
    assert reassemble(chunks[:-1], "text") == {0: text[:text.find(stop)]}


@pytest.mark.parametrize("route, body, status, param", [
    ("chat/completions", {"model": "policy"}, 400, "messages"),
    ("chat/completions", {"model": "policy", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "policy", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]"),
    ("chat/completions", {"messages": CHAT}, 400, "model"),
    ("chat/completions", {"model": "policy", "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"model": "policy", "messages": CHAT, "max_tokens": "9"}, 400, "max_tokens"),
    ("chat/completions", {"model": "policy", "messages": CHAT, "temperature": 3}, 400, "temperature"),
    ("chat/completions", {"model": "policy", "messages": CHAT, "n": 99}, 400, "n"),
    ("chat/completions", {"model": "policy", "messages": CHAT, "logprobs": True}, 400, "logprobs"),
    ("chat/completions", {"model": "policy", "messages": CHAT, "top_k": 5}, 400, "top_k"),
    ("chat/completions", {"model": "policy", "messages": CHAT, "stop": [""]}, 400, "stop"),
    ("completions", {"model": "policy", "prompt": "hi", "echo": True}, 400, "echo"),
    ("completions", {"model": "policy", "prompt": "hi", "logprobs": 0}, 400, "logprobs"),
    ("completions", {"model": "policy", "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completions", {"model": "policy", "prompt": [1, 2, 3]}, 400, "prompt"),
    ("completions", {"model": "policy", "prompt": "hi " * 2500}, 400, "prompt"),
    ("completions", b"{not json", 400, None),
])
def test_bad_requests_get_a_4xx_in_openai_error_shape(api, route, body, status, param):
    got, answer = call(f"{api}/{route}", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


def test_oversized_bodies_and_other_content_types_are_refused_in_openai_error_shape(api):
    status, body = call(api + "/completions", b"{" + b" " * (64 * 1024) + b"}")
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    status, body = call(api + "/completions", b"{}", {"Content-Type": "text/plain"})
    assert status == 415 and body["error"]["message"].startswith("send the request as JSON")


def test_a_prompt_over_the_context_is_refused_not_truncated(api):
    status, body = call(api + "/completions", {"model": "policy", "prompt": "hi " * 2500})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_harmless_fields_are_ignored_and_max_tokens_is_an_upper_bound(api, playground):
    # Neutral values as clients send them: 0.0 for a penalty (JSON has no int/float distinction a client keeps).
    request = {"model": "policy", "messages": CHAT, "temperature": 0, "user": "me", "presence_penalty": 0.0,
               "frequency_penalty": 0, "logprobs": False, "tool_choice": "none", "max_tokens": 10**6}
    status, body = call(api + "/chat/completions", request)
    assert status == 200
    assert body["usage"]["completion_tokens"] <= playground.limits.max_new_tokens


def test_token_is_required_beyond_loopback_and_bearer_is_accepted(playground):
    app = create_app(playground, local_only=False, token=TOKEN, api=True)
    with start_in_thread(app) as running:
        url = running.url + "v1/models"
        status, body = call(url)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert call(url, headers={"Authorization": "Bearer wrong-token-of-enough-length"})[0] == 401
        status, body = call(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and len(body["data"]) == 2


def test_the_openai_client_works_against_the_server(playground):
    openai = pytest.importorskip("openai", reason="the openai package is not installed")
    app = create_app(playground, local_only=False, token=TOKEN, api=True)
    with start_in_thread(app) as running:
        client = openai.OpenAI(base_url=running.url + "v1", api_key=TOKEN, max_retries=0)
        assert [m.id for m in client.models.list()] == ["policy", "reference"]
        samples, _ = expected(playground, "reference", CHAT, SamplingParams(max_new_tokens=12, temperature=0))
        reply = client.chat.completions.create(model="reference", messages=CHAT, temperature=0, max_tokens=12)
        assert reply.choices[0].message.content == samples[0].text
        stream = client.chat.completions.create(model="reference", messages=CHAT, temperature=0, max_tokens=12,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == samples[0].text
        text = client.completions.create(model="policy", prompt="Once upon a time", max_tokens=5, seed=1)
        raw = call(running.url + "v1/completions", {"model": "policy", "prompt": "Once upon a time", "max_tokens": 5,
                                                    "seed": 1}, {"Authorization": f"Bearer {TOKEN}"})[1]
        assert text.choices[0].text == raw["choices"][0]["text"] and text.usage.total_tokens > 0
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="policy", messages=CHAT, max_tokens=-1)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4", messages=CHAT)
        bad = openai.OpenAI(base_url=running.url + "v1", api_key="wrong-token-of-enough-length", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_dpokit_llm_judge_gets_its_answer_from_the_server(api, playground):
    judge = LLMJudge(api, "policy", retries=0)
    (verdict,) = judge.compare(["Which colour is the sky?"], ["Blue."], ["Green."])
    a, b = ("Green.", "Blue.") if verdict.swapped else ("Blue.", "Green.")
    prompt = [{"role": "user", "content": JUDGE_PROMPT.format(prompt="Which colour is the sky?", a=a, b=b)}]
    samples, _ = expected(playground, "policy", prompt, SamplingParams(max_new_tokens=256, temperature=0))
    # The judge's request (temperature 0, max_tokens 256) is answered greedily: the reply is the policy's own
    # greedy text, and the verdict is what parse_reply reads in it (a tiny random model names no answer).
    assert verdict.reply == samples[0].text and verdict.retries == 0
    expected_outcome = {None: "malformed", "tie": "tie"}.get(parse_reply(samples[0].text))
    assert expected_outcome is None or verdict.outcome == expected_outcome


def test_without_api_there_is_no_v1(playground):
    with start_in_thread(create_app(playground)) as running:
        status, body = call(running.url + "v1/models")
        assert status == 404 and body["error"]["type"] == "invalid_request_error"


def test_dpokit_serve_api_command_prints_the_base_url_and_answers(tiny_chat_run):
    with serve_command(tiny_chat_run, "--api", pattern=r"base_url (http://127\.0\.0\.1:\d+/v1)") as (process, base):
        status, body = call(base + "/completions", {"model": "policy", "prompt": "Hi", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0


def test_a_full_queue_is_a_503_with_retry_after_and_a_foreign_host_is_refused(playground):
    import dataclasses
    import http.client
    import threading

    from dpokit.serve.engine import Job, Limits

    app = create_app(dataclasses.replace(playground, limits=Limits(max_queue=0)), api=True)
    gate, started = threading.Event(), threading.Event()
    with start_in_thread(app) as running:
        app.state.worker.submit(Job(lambda emit, cancelled: (started.set(), gate.wait(30)), emit=lambda e: None))
        try:
            assert started.wait(30)
            status, body = call(running.url + "v1/completions", {"model": "policy", "prompt": "Hi"})
            assert status == 503 and body["error"]["type"] == "server_error"
        finally:
            gate.set()
        host, port = running.url[len("http://"):].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/v1/models", headers={"Host": "attacker.example"})
        response = conn.getresponse()
        assert response.status == 400 and "attacker.example" in json.loads(response.read())["error"]["message"]
        conn.close()
