"""The documentation cannot rot silently: the site builds strictly, the snippets marked runnable run, and every
other snippet names only real programs, dpokit subcommands, flags, files and Python attributes.

A snippet is a fenced ```bash or ```python block of README.md or a page of docs/. The line
``<!-- run: tiny -->`` just before one marks it runnable: it runs in seconds on the tiny model without network.
The runnable ones run in the order a reader meets them (README, then the pages in mkdocs.yml's navigation), in
one scratch folder holding copies of configs/ and examples/, where ``.venv/bin/dpokit`` is the dpokit under
test; so a page may use what an earlier one made (``runs/tiny``, trained by the README's).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dpokit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
RUN_MARK = "<!-- run: tiny -->"
OPEN = re.compile(r"^(\s*)```(\w*)\s*$")
# Programs a shell snippet may start with besides dpokit and make (whose subcommands and targets are checked).
PROGRAMS = {"python", "python3", ".venv/bin/python", "pip", ".venv/bin/pip", "torchrun", "srun", "sbatch",
            "scontrol", "head", "hf", "curl", "ssh", "tensorboard", "mlflow", "mkdocs", ".venv/bin/mkdocs", "git"}
SHELL_WORDS = {"if", "then", "else", "elif", "fi", "for", "do", "done", "set", "exit", "source", "export", "cd",
               "echo", "["}
DPOKIT = {"dpokit", ".venv/bin/dpokit"}
# A repository path a command names; it must exist (outputs go elsewhere: runs/, out/).
REPO_PATH = re.compile(r"^(configs|examples|benchmarks|tests)/[\w./-]*\w$")


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    runnable: bool

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def pages() -> list[Path]:
    """README.md, the pages in the navigation's order, then any other page of docs/."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    ordered = [ROOT / "docs" / page for page in nav_pages(config["nav"])]
    rest = sorted(set((ROOT / "docs").glob("*.md")) - set(ordered))
    return [ROOT / "README.md", *ordered, *rest]


def snippets(path: Path) -> list[Snippet]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = OPEN.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang, start = len(opening.group(1)), opening.group(2), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        i += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        if lang in ("bash", "python"):
            found.append(Snippet(path.relative_to(ROOT).as_posix(), start + 1, lang, "\n".join(body) + "\n",
                                 previous == RUN_MARK))
        elif previous == RUN_MARK:
            raise AssertionError(f"{path.relative_to(ROOT)}:{start + 1}: {RUN_MARK} marks a ```{lang} block; "
                                 "only bash and python blocks run")
    return found


SNIPPETS = [s for page in pages() for s in snippets(page)]


# ---------------------------------------------------------------------------------------------------------------
# The site


def test_the_site_builds_strictly(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(m.split(".")[0]) is None or
               (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]
    if missing:
        reason = f"{', '.join(missing)} not installed: pip install -c constraints.txt -e '.[docs]'"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the docs extra, yet {reason}")
        pytest.skip(reason)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The API reference is generated, not empty: the public functions and the config sections have their entries.
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("dpokit.train", "dpokit.sft", "dpokit.rm", "dpokit.score", "dpokit.load_config",
                 "dpokit.config.TrainConfig", "dpokit.losses.sigmoid_loss"):
        assert f'id="{name}"' in api, name


def test_readme_links_exist():
    """README.md is not part of the site, so its relative links are checked here."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?:)([^)#\s]+)(?:#[^)\s]*)?\)", text)
    assert targets
    assert [t for t in targets if not (ROOT / t).exists()] == []


# ---------------------------------------------------------------------------------------------------------------
# Snippets that run


def test_every_page_with_a_run_mark_has_it_on_a_snippet():
    for page in pages():
        marks = sum(line.strip() == RUN_MARK for line in page.read_text(encoding="utf-8").splitlines())
        runnable = sum(s.runnable for s in snippets(page))
        assert marks == runnable, f"{page.relative_to(ROOT)}: {marks} marks, {runnable} runnable snippets"


def test_the_marked_snippets_run(tmp_path):
    runnable = [s for s in SNIPPETS if s.runnable]
    assert runnable[0].page == "README.md", "the README's training snippet makes runs/tiny for the pages"
    for folder in ("configs", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "dpokit"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dpokit "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           # Caches (data, hardware probe) of this scratch folder only; one thread, as a tiny model gains nothing
           # from more and their spin-waits slow it several times on a shared CPU (about 90 s of CPU in all).
           "DPOKIT_CACHE": str(tmp_path / "cache"), "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    for snippet in runnable:
        command = (["bash", "-euo", "pipefail", "-c", snippet.code] if snippet.lang == "bash"
                   else [sys.executable, "-c", snippet.code])
        try:
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{snippet.where}: still running after 300 s; a marked snippet must run in seconds")
        assert done.returncode == 0, (f"{snippet.where}: exit {done.returncode}\n{snippet.code}\n"
                                      f"{done.stdout[-2000:]}{done.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------------------------
# Snippets that are only checked


def commands(code: str) -> list[list[str]]:
    """The simple commands of a shell snippet: continuation lines joined, comments dropped, split at ; && || |,
    leading VAR=value assignments dropped (``X=$(cmd ...)`` gives cmd's)."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            raise AssertionError(f"{line!r}: {error}") from None
        command: list[str] = []
        for word in [*words, ";"]:
            if word in (";", "&&", "||", "|"):
                if command:
                    found.append(command)
                command = []
                continue
            if not command and (sub := re.match(r"^[A-Za-z_]\w*=\$\((.*)$", word)):
                word = sub.group(1)
                if not word:
                    continue
            elif not command and re.match(r"^[A-Za-z_]\w*=", word):
                continue
            command.append(word.rstrip(";"))
    return found


def subparsers_of(parser):
    return next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)


def dpokit_problem(argv: list[str]) -> str | None:
    """Why ``dpokit ARGV`` is not a real command (None when it is): every subcommand must exist and every
    flag belong to it. Placeholders (CONFIG, [key=value ...]) are not checked."""
    parser, path = build_parser(), ["dpokit"]
    for word in argv:
        word = word.strip("[]")
        if word.startswith("-") and word not in ("-", "..."):
            flag = word.split("=", 1)[0]
            if flag not in parser._option_string_actions:
                return f"{' '.join(path)} has no flag {flag}"
            continue
        if (sub := subparsers_of(parser)) is not None and word not in ("", "..."):
            if word not in sub.choices:
                return f"{' '.join(path)} has no subcommand {word!r}"
            parser = sub.choices[word]
            path.append(word)
    if subparsers_of(parser) is not None and "--version" not in argv and "--help" not in argv:
        return f"{' '.join(path)} needs a subcommand"
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


def shell_problems(snippet: Snippet) -> list[str]:
    problems = []
    for words in commands(snippet.code):
        program, rest = words[0], words[1:]
        named = [w.split(":")[0] for w in words]  # examples/rewards.py:letter_e names examples/rewards.py
        paths = [w for w in named if REPO_PATH.match(w) and not (ROOT / w).exists()]
        problems += [f"{w}: no such file in the repository" for w in paths]
        if program in DPOKIT:
            problems.append(dpokit_problem(rest))
        elif program == "make":
            problems += [f"make has no target {t!r}" for t in rest if not t.startswith("-") and "=" not in t
                         and t not in make_targets()]
        elif program in PROGRAMS:
            if "-m" in rest and rest[rest.index("-m") + 1:][:1] == ["dpokit"]:
                problems.append(dpokit_problem(rest[rest.index("-m") + 2:]))
        elif program not in SHELL_WORDS:
            problems.append(f"{program!r} is not a known program (tests/test_docs.py: PROGRAMS)")
    return [p for p in problems if p]


def python_problems(snippet: Snippet) -> list[str]:
    try:
        tree = ast.parse(snippet.code, filename=snippet.where)
    except SyntaxError as error:
        return [f"does not compile: {error}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dpokit":
            module = importlib.import_module(node.module)
            problems += [f"{node.module} has no {a.name}" for a in node.names if not hasattr(module, a.name)]
        elif isinstance(node, ast.Attribute):
            chain = []
            while isinstance(node, ast.Attribute):
                chain.insert(0, node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id == "dpokit" and (p := attribute_problem(chain)):
                problems.append(p)
    return sorted(set(problems))


def attribute_problem(chain: list[str]) -> str | None:
    obj, name = importlib.import_module("dpokit"), "dpokit"
    for attr in chain:
        if not hasattr(obj, attr):
            try:
                obj = importlib.import_module(f"{name}.{attr}")
            except ModuleNotFoundError:
                return f"{name} has no attribute {attr}"
        else:
            obj = getattr(obj, attr)
        name = f"{name}.{attr}"
    return None


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.where for s in SNIPPETS])
def test_the_snippet_names_only_real_things(snippet):
    problems = shell_problems(snippet) if snippet.lang == "bash" else python_problems(snippet)
    assert problems == [], f"{snippet.where}: " + "; ".join(problems)


def test_the_checks_catch_rot():
    """The checks above fail on what they are for (else every snippet would pass by construction)."""
    bad = Snippet("x.md", 1, "bash", ".venv/bin/dpokit train configs/nope.yaml --no-such-flag\n"
                  "dpokit trian CONFIG\nmake nope\nfrobnicate --now\n"
                  "torchrun --nproc_per_node 2 -m dpokit train --reusme CONFIG\n", False)
    assert shell_problems(bad) == ["configs/nope.yaml: no such file in the repository",
                                   "dpokit train has no flag --no-such-flag", "dpokit has no subcommand 'trian'",
                                   "make has no target 'nope'",
                                   "'frobnicate' is not a known program (tests/test_docs.py: PROGRAMS)",
                                   "dpokit train has no flag --reusme"]
    good = Snippet("x.md", 1, "bash", "CONFIG=x.yaml HEAD=$(scontrol show hostnames | head -n1)\n"
                   "dpokit plan CONFIG [key=value ...] [--gpu-memory 80GB] [--gpus N]\n"
                   "dpokit data check examples/prefs-chat.jsonl --show=3 && make test\n", False)
    assert shell_problems(good) == []
    python = Snippet("x.md", 1, "python", "import dpokit\ndpokit.trian('x')\nfrom dpokit.config import Nope\n"
                     "dpokit.rewards.get_reward\n", False)
    assert python_problems(python) == ["dpokit has no attribute trian", "dpokit.config has no Nope"]  # sorted
    assert python_problems(Snippet("x.md", 1, "python", "def (:\n", False))[0].startswith("does not compile")
