"""``data.columns``: a dataset's own column names mapped onto dpokit's, before the format of a row is detected.

``data.columns`` maps a dpokit name (a key of :data:`COLUMN_TARGETS`) to the dataset's column, e.g.
``{prompt: question, system: system}`` for Intel/orca_dpo_pairs or ``{prompt: trajectory}`` for
openbmb/UltraInteract_pair. The mapped columns replace any column of the target's name; the other columns stay
(and are ignored unless they are dpokit names).

``label`` mapped together with ``chosen`` and ``rejected`` is a pair's preference, as in stanfordnlp/SHP
(``{prompt: history, chosen: human_ref_A, rejected: human_ref_B, label: labels}``): ``1``/``true`` means the
``chosen`` column's text is preferred, ``0``/``false`` that the ``rejected`` column's is (the two are swapped);
any other value is a malformed row. Without ``chosen``/``rejected`` a mapped ``label`` is the KTO label of an
unpaired row, as a ``label`` column is.

:data:`PROMPT_LIKE` names the columns that hold a prompt in datasets that have no ``prompt`` column: an
implicit-prompt row (``chosen``/``rejected`` text and no ``prompt``) beside one of them is refused, because the
guess would drop it (``dpokit.data.formats``).
"""

from __future__ import annotations

from typing import Any

from dpokit.data.load import RowError

COLUMN_TARGETS = {
    "prompt": "the prompt (text or messages)",
    "chosen": "the preferred response",
    "rejected": "the dispreferred response",
    "system": "a system prompt, applied through the chat template as a system message",
    "completion": "the one response of an unpaired (KTO) row",
    "label": "KTO: whether the completion is desirable; beside chosen and rejected: 1 if the chosen column is "
             "preferred, 0 if the rejected one is (SHP)",
    "responses": "the responses of a ranked row",
    "ranking": "the rank of each response, lower is better",
    "scores": "the score of each response, higher is better",
}
"""The names ``data.columns`` maps onto, with what each holds."""

PROMPT_LIKE = ("question", "input", "instruction", "query", "context", "trajectory", "history", "system",
               "conversation", "conversations", "messages", "dialogue", "post")
"""Column names (compared in lower case) that hold a prompt, or part of one, in popular datasets without a
``prompt`` column."""


def check_columns(columns: dict[str, str]) -> None:
    """A ``data.columns`` value is usable: known targets, non-empty source names, a pair label only with both
    responses. Raises ValueError (the config names the key)."""
    for target, column in columns.items():
        if target not in COLUMN_TARGETS:
            raise ValueError(f"unknown target '{target}'; expected one of {', '.join(COLUMN_TARGETS)}")
        if not isinstance(column, str) or not column:
            raise ValueError(f"'{target}' must name a column of the dataset")
    if "label" in columns and ("chosen" in columns) != ("rejected" in columns):
        raise ValueError("'label' maps a pair's preference only with both 'chosen' and 'rejected' mapped")
    if "label" in columns and "chosen" not in columns and "completion" not in columns:
        raise ValueError("'label' maps a pair's preference (with 'chosen' and 'rejected') or a KTO label "
                         "(with 'completion')")


def apply_columns(row: dict[str, Any], columns: dict[str, str] | None, loc: str) -> dict[str, Any]:
    """``row`` with its columns renamed by ``data.columns`` (see the module docstring); a pair label is applied
    (chosen and rejected in preference order) and removed."""
    if not columns:
        return row
    mapped = set(columns.values())
    out = {key: value for key, value in row.items() if key not in mapped}
    for target, column in columns.items():
        if column not in row:
            raise RowError(f"{loc}: missing column '{column}' (data.columns.{target})", "missing_key")
        out[target] = row[column]
    if "label" in columns and "chosen" in columns:
        label = out.pop("label")
        if label not in (0, 1):  # True == 1 and False == 0
            raise RowError(f"{loc}: '{columns['label']}' (data.columns.label) must be 1/true (the "
                           f"'{columns['chosen']}' column is preferred) or 0/false (the '{columns['rejected']}' "
                           f"column is), got {label!r:.40}", "wrong_type")
        if not label:
            out["chosen"], out["rejected"] = out["rejected"], out["chosen"]
    return out


def prompt_like_columns(row: dict[str, Any]) -> list[str]:
    """The columns of ``row`` that look like they hold the prompt or part of it (:data:`PROMPT_LIKE`), a
    ``system`` column last."""
    found = [key for key in row if isinstance(key, str) and key.lower() in PROMPT_LIKE]
    return sorted(found, key=lambda key: key.lower() == "system")
