"""The figures table of ``gpu_check.py``: one line per figure as it is measured, then Markdown or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    section: str
    name: str
    value: str
    bound: str = ""
    status: str = "info"  # pass | FAIL | skip | info
    note: str = ""


class Report:
    def __init__(self, title: str = "dpokit GPU check") -> None:
        self.title = title
        self.figures: list[Figure] = []
        self.info: dict[str, Any] = {}

    def add(self, section: str, name: str, value: Any, bound: Any = "", status: str = "info",
            note: str = "") -> Figure:
        figure = Figure(section, name, _fmt(value), _fmt(bound), status, note)
        self.figures.append(figure)
        print(f"[{section}] {name}: {figure.value}" + (f" (bound {figure.bound})" if figure.bound else "")
              + f" {status}" + (f" - {note}" if note else ""), flush=True)
        return figure

    def check(self, section: str, name: str, value: float, bound: float, note: str = "") -> bool:
        """``value <= bound`` (both finite) passes."""
        ok = math.isfinite(value) and value <= bound
        self.add(section, name, value, bound, "pass" if ok else "FAIL", note)
        return ok

    def verify(self, section: str, name: str, ok: bool, note: str = "") -> bool:
        """A yes/no check."""
        self.add(section, name, "yes" if ok else "no", status="pass" if ok else "FAIL", note=note)
        return ok

    def skip(self, section: str, name: str, why: str) -> None:
        self.add(section, name, "-", status="skip", note=why)

    @property
    def failed(self) -> list[Figure]:
        return [f for f in self.figures if f.status == "FAIL"]

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        lines += [f"- {key}: {value}" for key, value in self.info.items()]
        lines += ["", "| section | figure | value | bound | status | note |", "|---|---|---|---|---|---|"]
        for f in self.figures:
            cells = [f.section, f.name, f.value, f.bound, f.status, f.note]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        failed = len(self.failed)
        lines += ["", f"{len(self.figures)} figures, {failed} failed." if failed else
                  f"{len(self.figures)} figures, none failed."]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            text = json.dumps({"info": self.info, "figures": [asdict(f) for f in self.figures],
                               "failed": len(self.failed)}, indent=2) + "\n"
        else:
            text = self.markdown()
        path.write_text(text, encoding="utf-8")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"
    return str(x)
