"""Showing a response while it is being generated.

The tokens come from ``dpokit.models.generate.stream_batch``, the very loop behind ``generate``, so what the page
streams for a prompt repeated n times at a seed is exactly what ``generate`` returns (tested).
:class:`IncrementalText` turns the growing token lists into text deltas for the page.
"""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """The decoded text of a growing token list, handed out as deltas.

    Byte-level tokenizers split a multi-byte character over several tokens; until its last byte arrives the
    decoder shows U+FFFD, so a text ending in it is held back rather than shown and taken back. Should decoding
    ever rewrite earlier text, the delta is the whole text with ``replace=True``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> tuple[str, bool] | None:
        """Add a token; returns (text, replace) to show, or None when nothing new is visible yet."""
        self.ids.append(token)
        text = self.text
        if text.endswith("\ufffd"):
            return None
        return self._show(text)

    def flush(self) -> tuple[str, bool] | None:
        """The final text (held-back characters included), when it differs from what was shown."""
        return self._show(self.text)

    @property
    def text(self) -> str:
        # The same decoding as dpokit.models.generate.Sample.text: the text that is shown is the text that is scored.
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _show(self, text: str) -> tuple[str, bool] | None:
        if text == self.shown:
            return None
        if text.startswith(self.shown):
            delta, replace = text[len(self.shown):], False
        else:
            delta, replace = text, True
        self.shown = text
        return delta, replace
