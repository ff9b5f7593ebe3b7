"""mkdocs hooks: links to repository files outside docs/, and the Sphinx roles of docstrings.

A page's link to a repository file outside docs/ points at a copy of that file in the site.

The pages are read in the repository too, where ``../src/dpokit/config.py`` is the right link. On the site the
linked file is copied under ``repo/`` (a Markdown file is rendered as a page) and the link rewritten to that
copy, so both work. A link to a file that does not exist is left alone, for mkdocs' own strict check to fail.

The docstrings (rendered by mkdocstrings as Markdown) name objects the Sphinx way, :func:`train`,
:class:`~dpokit.config.Config`; the role and the tilde are dropped from the rendered page, leaving the code.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

PREFIX = "repo"
# A Markdown link or image target: ](path) or ](path#anchor), relative, not a URL.
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(#[^)\s]*)?\)")
# A Sphinx role as Markdown renders it: :func:<code>~name</code>.
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(<code>)~?")


def _outside_target(page_uri: str, target: str, docs_dir: Path, root: Path) -> str | None:
    """The repository-relative path a page's link names, when it leaves docs/ for an existing file."""
    resolved = (docs_dir / posixpath.dirname(page_uri) / target).resolve()
    if resolved.is_relative_to(docs_dir.resolve()) or not resolved.is_relative_to(root.resolve()):
        return None
    return resolved.relative_to(root.resolve()).as_posix() if resolved.is_file() else None


def on_files(files: Files, config) -> Files:
    docs_dir = Path(config["docs_dir"])
    root = docs_dir.parent
    wanted: set[str] = set()
    for file in files.documentation_pages():
        text = Path(file.abs_src_path).read_text(encoding="utf-8")
        for target, _ in LINK.findall(text):
            if (path := _outside_target(file.src_uri, target, docs_dir, root)) is not None:
                wanted.add(path)
    for path in sorted(wanted):
        files.append(File.generated(config, f"{PREFIX}/{path}", abs_src_path=str(root / path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"])
    root = docs_dir.parent
    uri = page.file.src_uri
    if uri.startswith(f"{PREFIX}/"):
        return markdown
    up = "../" * uri.count("/")

    def rewrite(match: re.Match) -> str:
        target, anchor = match.group(1), match.group(2) or ""
        path = _outside_target(uri, target, docs_dir, root)
        return match.group(0) if path is None else f"]({up}{PREFIX}/{path}{anchor})"

    return LINK.sub(rewrite, markdown)


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(r"\1", html)
