"""The web layer of ``dpokit serve``: a small Starlette app run by uvicorn.

Routes (nothing else; no route takes a path, so no request can name a file):

``GET /``               the page (``index.html``, read once at start-up; inline CSS and JS, no external asset)
``GET /api/info``       the run, example prompts, limits and defaults, whether it takes images, as JSON
``POST /api/generate``  a JSON request; answered with newline-delimited JSON events (``application/x-ndjson``)
                        streamed as they happen, or with a 4xx / 503 and ``{"error": message}``

Listening on a loopback address, requests whose ``Host`` is not 127.0.0.1 / localhost are refused (a page on
another site that points its domain at 127.0.0.1, DNS rebinding, could otherwise use the server as its own).
Listening beyond loopback, every request must carry the access token (``dpokit serve --token``, or one made up
at start and printed with the URL): ``?token=...`` in the URL (the page then keeps it in a same-site cookie), an
``Authorization: Bearer ...`` or an ``X-Dpokit-Token`` header. Tokens are compared in constant time.

Streaming: the request handler checks the request (``Playground.prepare``) and queues a job on the one
``Worker`` thread; the worker's events cross into the event loop with ``call_soon_threadsafe`` onto an asyncio
queue that the streaming response drains. When the browser goes away (a new run, a closed tab), Starlette
cancels the response and the ``finally`` below marks the job cancelled: the worker skips it or stops it at its
next token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
import sys
import threading
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dpokit.errors import DpokitError
from dpokit.evaluate.report import PAGE_BASE
from dpokit.serve import MAX_QUEUE
from dpokit.serve.engine import BadRequest, Event, Job, Playground, QueueFull, Worker
from dpokit.serve.http import AsciiJSONResponse, parse_json, read_body, sends_json, submit

TERMINAL = ("done", "error")
RETRY_AFTER_S = 5
"""``Retry-After`` of a 503 (the queue is full): about the time a few requests of the page's defaults take on a
CPU, so a client that honours it neither hammers the server nor waits long after a slot frees up."""


def page_and_policy() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that lets it run its own inline script and style and reach
    nothing but this server."""
    page = resources.files("dpokit.serve").joinpath("index.html").read_text(encoding="utf-8")
    page = page.replace("/* dpokit:page-base */\n", PAGE_BASE, 1)
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in scripts)
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
              "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page.encode("utf-8"), policy


def error(message: str, status: int, headers: dict[str, str] | None = None, scope: Any = None) -> JSONResponse:
    """``{"error": message}``; under ``/v1/`` (``--api``) OpenAI's shape, which its clients read."""
    if scope is not None and str(scope.get("path", "")).startswith("/v1/"):
        from dpokit.serve.openai_api import error_body

        return AsciiJSONResponse(error_body(message, status), status_code=status, headers=headers)
    return AsciiJSONResponse({"error": message}, status_code=status, headers=headers)


LOCAL_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})


def host_name(header: str) -> str:
    """``Host: name:port`` -> ``name`` (``[::1]:7860`` -> ``[::1]``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.split(":", 1)[0]


class LocalHostOnly:
    """Answer only requests addressed to this machine by name. A web page elsewhere can point its own domain
    name at 127.0.0.1 (DNS rebinding) and then call this server as its own origin; such requests carry that
    name in ``Host`` and are refused."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in LOCAL_NAMES:
                answer = error(f"this server answers requests for 127.0.0.1 or localhost only, not '{host}' "
                               "(dpokit serve --host chooses where it listens)", 400, scope=scope)
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


TOKEN_COOKIE = "dpokit_token"
"""The cookie's name, ``_PORT`` added: browsers share cookies across a host's ports, and two servers on one
machine must not overwrite each other's token."""
MIN_TOKEN_CHARS = 16


def check_token(token: str) -> str:
    """A usable access token, or one line saying why not (a short one is guessable over the network)."""
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise DpokitError(f"--token: use at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces "
                          "(or leave it out: dpokit serve makes one up and prints it)")
    return token


def new_token() -> str:
    return secrets.token_urlsafe(24)


def cookie_name(scope: Any) -> str:
    server = scope.get("server") or ("", 0)
    return f"{TOKEN_COOKIE}_{server[1]}"


class TokenRequired:
    """Answer only requests that carry the access token: in the query (``?token=``), a bearer
    ``Authorization`` header, an ``X-Dpokit-Token`` header, or the cookie the page got with its first load. The
    comparison takes the same time whatever the guess (``hmac.compare_digest``)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode("ascii")

    def offered(self, scope: Any) -> list[str]:
        request = Request(scope)
        auth = request.headers.get("authorization", "")
        return [request.query_params.get("token", ""), request.headers.get("x-dpokit-token", ""),
                auth[7:] if auth[:7].lower() == "bearer " else "", request.cookies.get(cookie_name(scope), "")]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = self.offered(scope)
        # Every candidate is compared (no early exit), so the time taken says nothing about which one matched.
        ok = False
        for candidate in offered:
            ok |= hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), self.token)
        if not ok:
            answer = error("this server needs its access token: open the URL dpokit serve printed (?token=...) "
                           "or send the header 'Authorization: Bearer TOKEN'", 401,
                           {"WWW-Authenticate": 'Bearer realm="dpokit serve"'}, scope)
            await answer(scope, receive, send)
            return
        if not offered[0]:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: Any) -> None:
            # The page's own requests carry no query: a strict same-site cookie carries the token for them.
            if message["type"] == "http.response.start":
                cookie = f"{cookie_name(scope)}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def create_app(playground: Playground, local_only: bool = True, token: str | None = None,
               api: bool = False) -> Starlette:
    """The app. Its worker thread starts here; ``app.state.worker.close()`` stops it. ``local_only``: refuse
    requests not addressed to 127.0.0.1 / localhost (right when listening on a loopback address). ``token``:
    refuse requests that do not carry it (``TokenRequired``). ``api``: serve the OpenAI-compatible ``/v1``
    routes too (``dpokit.serve.openai_api``), on the same worker as the page."""
    page, policy = page_and_policy()
    worker = Worker(playground.limits.max_queue)
    # A vision-language run takes images in the body (``Limits.body_bytes``).
    limit = playground.limits.body_bytes(getattr(playground, "vision", None) is not None)

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return JSONResponse(playground.info(), headers={"Cache-Control": "no-store"})

    async def generate(request: Request) -> Response:
        if not sends_json(request):
            return error("send the request as JSON (Content-Type: application/json)", 415)
        try:
            body = await read_body(request, limit)
            payload = parse_json(body)
            checked = await run_in_threadpool(playground.prepare, payload)
        except BadRequest as exc:
            return error(str(exc), exc.status)
        try:
            job, events = submit(worker, partial(playground.run, checked))
        except QueueFull as exc:
            return error(f"busy: {exc}", 503, {"Retry-After": str(RETRY_AFTER_S)})
        return StreamingResponse(stream(events, job), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.detail, exc.status_code, dict(exc.headers or {}), request.scope)

    async def internal_error(request: Request, exc: Exception) -> Response:
        traceback.print_exception(exc, file=sys.stderr)
        return error(f"internal error ({type(exc).__name__}); see the server log", 500, scope=request.scope)

    routes = [Route("/", index, methods=["GET"]), Route("/api/info", info, methods=["GET"]),
              Route("/api/generate", generate, methods=["POST"])]
    if api:
        from dpokit.serve.openai_routes import api_routes

        routes += api_routes(playground, worker, RETRY_AFTER_S)
    app = Starlette(routes=routes,
                    middleware=([Middleware(LocalHostOnly)] if local_only else [])
                    + ([Middleware(TokenRequired, token=token)] if token else []),
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.router.redirect_slashes = False  # "/api/generate/" is no route: a 404, not a redirect to one
    app.state.worker = worker
    app.state.playground = playground
    return app


async def stream(events: asyncio.Queue[Event], job: Job) -> AsyncIterator[bytes]:
    try:
        while True:
            event = await events.get()
            yield (json.dumps(event, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            if event["type"] in TERMINAL:
                return
    finally:
        job.cancelled.set()  # after the end, harmless; before it, the client left


# ---------------------------------------------------------------------------------------------------- server

def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not."""
    if not 0 <= port <= 65535:
        raise DpokitError(f"--port: must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise DpokitError(f"--host: cannot resolve '{host}'") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise DpokitError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"
    return f"http://{shown}:{port}/"


def uvicorn_server(app: Starlette) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none",
                            http="h11", loop="asyncio", limit_concurrency=256, timeout_keep_alive=5,
                            timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    """A server on a background thread (tests, notebooks): ``url``, and ``stop()``."""

    url: str
    app: Starlette
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.worker.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve ``app`` on a background thread; ``port=0`` picks a free port. Returns once it accepts."""
    sock = bind(host, port)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dpokit-serve-http",
                              daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise DpokitError("the web server did not start")
        thread.join(0.02)
    return RunningServer(url_of(sock), app, server, thread)


def serve(run_dir: str, ref: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          reward: str | None = None, precision: str = "auto", max_queue: int = MAX_QUEUE,
          token: str | None = None, api: bool = False, log: Any = print) -> None:
    """``dpokit serve``: load the run, listen, and serve until interrupted (Ctrl+C). Beyond loopback every
    request needs ``token`` (made up here when not given); on loopback only when one is given."""
    from dpokit.rewards import get_reward
    from dpokit.serve.engine import Limits, check_run_dir, load_playground

    if max_queue < 0:
        raise DpokitError(f"--max-queue: must be 0 or more, got {max_queue}")
    check_run_dir(run_dir)
    if token is not None:
        check_token(token)
    elif not is_loopback(host):
        token = new_token()
    if reward is not None:
        get_reward(reward)
    sock = bind(host, port)  # a taken port is reported before minutes of model loading
    try:
        log(f"loading {run_dir} ...")
        playground = load_playground(run_dir, ref=ref, reward=reward, precision=precision,
                                     limits=Limits(max_queue=max_queue), note=log)
        app = create_app(playground, local_only=is_loopback(host), token=token, api=api)
        if not is_loopback(host):
            log(f"note: listening on {host}: only requests carrying the access token are answered")
        url = url_of(sock) + (f"?token={token}" if token else "")
        log(f"dpokit serve: {url}  (beta={playground.scorer.beta:g}, reference: "
            f"{playground.reference_name}; Ctrl+C stops)")
        if api:
            log(f"OpenAI-compatible API: base_url {url_of(sock)}v1, models policy and reference"
                + (", api_key: the token" if token else ""))
        try:
            uvicorn_server(app).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C once it has shut down; stopping is the normal end
            pass
        finally:
            app.state.worker.close(timeout=1)
        log("dpokit serve: stopped")
    finally:
        sock.close()
