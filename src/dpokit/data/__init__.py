"""Preference data: load (files or hub) -> normalize formats -> validate -> tokenize (boundary-safe) -> batch.

- ``load``: rows with their ``path:line`` locations from JSONL / JSON / CSV / Parquet / a hub dataset
- ``memory``: rows given in memory (a ``datasets.Dataset``, a list of dicts, a DataFrame), named by their hash
- ``columns``: ``data.columns``, a dataset's column names mapped onto dpokit's (SHP's label orders the pair)
- ``formats``: the standard, conversational, implicit-prompt, ranked and unpaired formats into one
  :class:`PreferenceRow` (a prompt, its responses best first, tie levels); a ``system`` column applied
- ``implicit``: where an implicit prompt ends in dialogue text (turn markers), or that it cannot be told
- ``drops``: the drop reasons and the content checks of a normalized row
- ``tokenize``: a :class:`TokenizedGroup` per row (a pair is K = 2): prompt ids exactly a prefix of the model
  input, one BOS, one end token, truncation
- ``batch``: groups -> tensors in the padded or packed layout ``dpokit.models.logprobs`` scores
- ``pipeline``: :func:`load_preferences` / :func:`load_ranked`, the streaming :func:`iter_tokenized` and the
  :class:`DataReport`
- ``overlap``: :func:`find_overlap` between train and eval
- ``check``: ``dpokit data check``
"""

from dpokit.data.formats import (
    CONTENT_REASONS,
    DROP_REASONS,
    MALFORMED_REASONS,
    PreferenceRow,
    normalize,
    split_implicit,
    strict_pairs,
)
from dpokit.data.load import Record, RowError, iter_records, scan_records
from dpokit.data.overlap import find_overlap, overlap_report
from dpokit.data.pipeline import (
    DataReport,
    iter_tokenized,
    load_any,
    load_preferences,
    load_ranked,
    load_unpaired,
)
from dpokit.data.tokenize import TokenizedGroup, encode_rows, token_rules, tokenize_pair

__all__ = [
    "CONTENT_REASONS", "DROP_REASONS", "DataReport", "MALFORMED_REASONS", "PreferenceRow", "Record", "RowError",
    "TokenizedGroup", "encode_rows", "find_overlap", "iter_records", "iter_tokenized", "load_any",
    "load_preferences", "load_ranked", "load_unpaired", "normalize", "overlap_report", "scan_records", "split_implicit",
    "strict_pairs", "token_rules", "tokenize_pair",
]
