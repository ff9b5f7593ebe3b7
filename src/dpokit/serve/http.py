"""What the page's routes (``app``) and the OpenAI routes (``openai_routes``) share: reading and parsing a
request's JSON body, ASCII-only JSON answers, and queueing a job whose events stream back into the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from dpokit.serve.engine import BadRequest, Emit, Event, Job, Worker

DRAIN_BYTES = 1 << 20
"""An oversized body up to this size is read and dropped before the 413, so the client reads the answer
instead of a reset connection; a larger one is answered at once."""


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a message may quote a request's text, and a lone surrogate
    in it (valid in JSON, not in UTF-8) must not turn a 4xx into a crash."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def sends_json(request: Request) -> bool:
    """A JSON content type keeps other web sites out: their pages cannot send it without a CORS preflight,
    which this server never grants."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    too_large = f"request too large: at most {limit} bytes"
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest("invalid Content-Length", 400)
        if int(declared) > limit:
            if int(declared) <= DRAIN_BYTES:
                async for _ in request.stream():
                    pass
            raise BadRequest(f"{too_large}, got {int(declared)}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(too_large, 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise BadRequest("empty request; send a JSON object such as {\"prompt\": \"Hello\"}", 400)
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("invalid request: not UTF-8 text", 400) from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", 400) from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply", 400) from None
    except ValueError:  # the only other: an integer literal longer than Python's int conversion limit
        raise BadRequest("invalid JSON: a number with too many digits", 400) from None


def emit_threadsafe(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event], cancelled: threading.Event,
                    event: Event) -> None:
    """Hand an event from the worker thread to the event loop; a closed loop means nobody is listening."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, event)
    except RuntimeError:
        cancelled.set()


def submit(worker: Worker, work: Callable[[Emit, threading.Event], None]) -> tuple[Job, asyncio.Queue[Event]]:
    """Queue ``work(emit, cancelled)`` on ``worker``; its events arrive on the returned queue, in this event
    loop. Raises ``QueueFull`` when the queue is full."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    cancelled = threading.Event()
    job = Job(work, partial(emit_threadsafe, loop, events, cancelled), cancelled)
    worker.submit(job)
    return job, events
