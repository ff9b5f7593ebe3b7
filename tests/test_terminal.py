"""What reaches a terminal: ``--version``, and colour only on a TTY without ``NO_COLOR``."""

import io
import subprocess
import sys

from rich.table import Table

import dpokit
from dpokit import terminal
from dpokit.training.metrics import Progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def printed(monkeypatch, stream) -> str:
    monkeypatch.setattr(sys, "stdout", stream)
    table = Table(title="t")
    table.add_column("[bold red]metric[/]")
    table.add_row("[green]loss[/]")
    terminal.console().print(table)
    return stream.getvalue()


def test_colour_only_on_a_tty_without_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert "\x1b[" in printed(monkeypatch, FakeTTY())
    assert "\x1b[" not in printed(monkeypatch, io.StringIO())  # a pipe
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in printed(monkeypatch, FakeTTY())
    monkeypatch.setenv("NO_COLOR", "")  # set but empty: colour stays on (no-color.org)
    monkeypatch.setenv("TERM", "dumb")
    assert "\x1b[" not in printed(monkeypatch, FakeTTY())


def test_progress_off_a_tty_is_plain_lines(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines: list[str] = []
    bar = Progress(10, say=lines.append)
    for step in range(1, 11):
        bar.update(step, {"loss": 0.5, "rewards/accuracies": 1.0})
    bar.close()
    assert not bar.interactive and len(lines) == 10 and not any("\x1b" in line for line in lines)


def test_version():
    out = subprocess.run([sys.executable, "-m", "dpokit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dpokit {dpokit.__version__}"
