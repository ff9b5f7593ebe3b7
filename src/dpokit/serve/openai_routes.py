"""The HTTP side of ``dpokit serve --api`` (see :mod:`dpokit.serve.openai_api`): the ``/v1`` routes, OpenAI's
JSON for a whole completion, and the server-sent events of a streamed one."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dpokit.serve.engine import BadRequest, Event, Job, Playground, QueueFull, Worker, _show
from dpokit.serve.http import AsciiJSONResponse, parse_json, read_body, sends_json, submit
from dpokit.serve.openai_api import MODELS, Completion, Kind, OpenAIApi, error_body


def api_error(message: str, status: int, param: str | None = None, code: str | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
    return AsciiJSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def api_routes(playground: Playground, worker: Worker, retry_after_s: int) -> list[Route]:
    """The ``/v1`` routes, run on the page's ``worker`` (one job at a time for page and API together)."""
    api = OpenAIApi(playground)
    # A vision-language run takes images in the body (``Limits.body_bytes``).
    limit = playground.limits.body_bytes(getattr(playground, "vision", None) is not None)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": api.models()})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in api.aliases:
            return api_error(f"model {_show(name)} does not exist; this server has {', '.join(MODELS)}", 404,
                             "model", "model_not_found")
        return JSONResponse({"id": name, "object": "model", "created": 0, "owned_by": "dpokit"})

    async def complete(request: Request, kind: Kind) -> Response:
        # As the page's /api/generate: a JSON content type keeps other web sites' pages out (no CORS preflight
        # is ever granted).
        if not sends_json(request):
            return api_error("send the request as JSON (Content-Type: application/json)", 415)
        try:
            payload = parse_json(await read_body(request, limit))
            checked = await run_in_threadpool(api.prepare, payload, kind)
        except BadRequest as exc:
            return api_error(str(exc), 400 if exc.status == 422 else exc.status, getattr(exc, "param", None),
                             getattr(exc, "code", None))
        try:
            job, events = submit(worker, partial(api.run, checked))
        except QueueFull as exc:
            return api_error(f"busy: {exc}", 503, headers={"Retry-After": str(retry_after_s)})
        shape = Shape(checked, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}",
                      int(time.time()))
        if checked.stream:
            return StreamingResponse(sse(events, job, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
        try:
            while (event := await events.get())["type"] not in ("final", "error"):
                pass
        finally:
            job.cancelled.set()
        if event["type"] == "error":
            return api_error(event["message"], 500)
        return JSONResponse(shape.whole(event["choices"]), headers={"Cache-Control": "no-store"})

    return [Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{model}", model, methods=["GET"]),
            Route("/v1/chat/completions", partial(complete, kind="chat"), methods=["POST"]),
            Route("/v1/completions", partial(complete, kind="text"), methods=["POST"])]


@dataclass(frozen=True)
class Shape:
    """The JSON of OpenAI's answers for one request: the whole completion, and the chunks of a stream."""

    request: Completion
    id: str
    created: int

    @property
    def chat(self) -> bool:
        return self.request.kind == "chat"

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created,
                "model": self.request.model, "system_fingerprint": None}

    def usage(self, tokens: int) -> dict[str, int]:
        prompt = len(self.request.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}

    def whole(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self.head(chunk=False)
        if self.chat:
            body["choices"] = [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                                "logprobs": None, "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)]
        else:
            body["choices"] = [{"index": i, "text": c["text"], "logprobs": None,
                                "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)]
        body["usage"] = self.usage(sum(c["tokens"] for c in choices))
        return body

    def chunk(self, pieces: list[tuple[int, dict[str, Any]]]) -> bytes:
        """``pieces``: (choice index, {"text"?, "role"?, "finish_reason"?})."""
        body = self.head(chunk=True)
        choices = []
        for i, piece in pieces:
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                delta = {"role": piece["role"]} if "role" in piece else {}
                if "text" in piece:
                    delta["content"] = piece["text"]
                choice["delta"] = delta
            else:
                choice["text"] = piece.get("text", "")
            choices.append({**choice, "logprobs": None, "finish_reason": piece.get("finish_reason")})
        body["choices"] = choices
        if self.request.include_usage:
            body["usage"] = None  # OpenAI's stream: every chunk has usage null but the last, which has no choices
        return data(body)


def data(body: Any) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=True, allow_nan=False)}\n\n".encode("ascii")


async def sse(events: asyncio.Queue[Event], job: Job, shape: Shape) -> AsyncIterator[bytes]:
    """The completion as server-sent events: a first chunk (the assistant role, for chat), the text as it comes,
    a last chunk per choice with its ``finish_reason``, the usage when asked for, then ``data: [DONE]``."""
    n = shape.request.n
    try:
        if shape.chat:
            yield shape.chunk([(i, {"role": "assistant", "text": ""}) for i in range(n)])
        while True:
            event = await events.get()
            if event["type"] == "delta":
                yield shape.chunk([(i, {"text": text}) for i, text in event["deltas"]])
            elif event["type"] == "final":
                choices = event["choices"]
                yield shape.chunk([(i, {"finish_reason": c["finish_reason"]}) for i, c in enumerate(choices)])
                if shape.request.include_usage:
                    yield data({**shape.head(chunk=True), "choices": [],
                                "usage": shape.usage(sum(c["tokens"] for c in choices))})
            elif event["type"] == "done":
                yield b"data: [DONE]\n\n"
                return
            elif event["type"] == "error":
                yield data(error_body(event["message"], 500))
                return
    finally:
        job.cancelled.set()  # after the end, harmless; before it, the client left
