"""Preference data: load (files or hub) -> normalize formats -> validate -> tokenize (boundary-safe) -> batch.

- ``load``: rows with their ``path:line`` locations from JSONL / JSON / CSV / Parquet / a hub dataset
- ``formats``: the standard, conversational, implicit-prompt and ranked formats into one shape; drop reasons
- ``tokenize``: prompt ids exactly a prefix of the model input, one BOS, one end token, truncation
- ``pipeline``: :func:`load_preferences` / :func:`load_ranked` and the :class:`DataReport`
- ``check``: ``dpokit data check``
"""

from dpokit.data.formats import DROP_REASONS, PreferenceRow, RankedRow, normalize, split_implicit
from dpokit.data.load import Record, iter_records
from dpokit.data.pipeline import DataReport, load_any, load_preferences, load_ranked
from dpokit.data.tokenize import TokenizedPair, TokenizedRanked, token_rules, tokenize_pair

__all__ = [
    "DROP_REASONS", "DataReport", "PreferenceRow", "RankedRow", "Record", "TokenizedPair", "TokenizedRanked",
    "iter_records", "load_any", "load_preferences", "load_ranked", "normalize", "split_implicit", "token_rules",
    "tokenize_pair",
]
