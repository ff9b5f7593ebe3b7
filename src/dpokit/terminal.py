"""What dpokit writes to a terminal: colour and live displays only where a person is watching.

Colour and the live progress bar need a terminal (``isatty``) that is not ``TERM=dumb``, and colour is off
whenever ``NO_COLOR`` is set to anything non-empty (https://no-color.org). On a pipe, in a file or in CI every
command writes plain text: no escape codes, no redrawn lines.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any


def note(message: str) -> None:
    """A one-line note on stderr, ``dpokit: message``, as every command says what it decided."""
    print(f"dpokit: {message}", file=sys.stderr, flush=True)


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def is_interactive(stream: IO[str] | None = None) -> bool:
    """A person's terminal: a TTY that can redraw lines."""
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
    return tty and os.environ.get("TERM") != "dumb"


def console(stderr: bool = False) -> Any:
    """A rich Console for tables and the progress bar: colour only on an interactive terminal without
    ``NO_COLOR``; elsewhere plain text (rich then emits no escape codes)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    interactive = is_interactive(stream)
    return Console(file=stream, force_terminal=interactive, no_color=no_color() or not interactive,
                   color_system=None if no_color() or not interactive else "auto",
                   highlight=False)
