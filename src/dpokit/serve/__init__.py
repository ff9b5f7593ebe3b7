"""``dpokit serve RUN_DIR``: a local web page to try a prompt on the reference pi_ref and the DPO policy pi side
by side, streaming both responses, with their implicit rewards beta * (log pi(y|x) - log pi_ref(y|x)).

- ``sampling``: token-by-token sampling (the loop of ``dpokit.models.generate``, one step at a time)
- ``engine``: request checks, the job (sample, stream, score); ``queue``: the one-worker FIFO queue
- ``images``: a vision-language run's image prompts (read, checked, placed, tokenized and scored as training)
- ``http``: what both route sets share: the JSON body, ASCII JSON answers, queueing a job and streaming its events
- ``app``: the Starlette app and the uvicorn server; ``index.html``: the page
- ``openai_api``, ``openai_routes``: ``--api``, the OpenAI-compatible ``/v1`` routes on the same server
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_QUEUE", "Limits", "create_app", "load_playground", "serve", "start_in_thread"]

MAX_QUEUE = 32
"""Requests waiting behind the running one (``dpokit serve --max-queue``); more get 503 with Retry-After.
Waiting costs a connection and a slot, no model memory: one job runs at a time."""


def __getattr__(name: str) -> Any:
    # Lazy: importing dpokit.serve costs nothing until something is used.
    if name in ("Limits", "load_playground"):
        from dpokit.serve import engine

        return getattr(engine, name)
    if name in ("create_app", "serve", "start_in_thread"):
        try:
            from dpokit.serve import app
        except ImportError as exc:
            from dpokit.errors import DpokitError

            raise DpokitError(f"dpokit serve needs the package {exc.name} (pip install starlette uvicorn)") from None
        return getattr(app, name)
    raise AttributeError(f"module 'dpokit.serve' has no attribute {name!r}")
