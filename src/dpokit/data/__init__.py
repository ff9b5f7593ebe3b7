"""Preference data: load (files or hub) -> normalize formats -> validate -> tokenize (boundary-safe) -> cache
-> batch. The data layer imports nothing above it (models, losses, training): the tokenizer, the cache folder
and the progress display are given by the caller.

- ``config``: :class:`~dpokit.data.config.DataConfig`, the ``data:`` section every function here takes
- ``load``: rows with their ``path:line`` locations from JSONL / JSON / CSV / Parquet / a hub dataset
- ``memory``: rows given in memory (a ``datasets.Dataset``, a list of dicts, a DataFrame), named by their hash
- ``columns``: ``data.columns``, a dataset's column names mapped onto dpokit's (SHP's label orders the pair)
- ``formats``: the standard, conversational, implicit-prompt, ranked and unpaired formats into one
  :class:`PreferenceRow` (a prompt, its responses best first, tie levels); a ``system`` column applied
- ``implicit``: where an implicit prompt ends in dialogue text (turn markers), or that it cannot be told
- ``drops``: the drop reasons and the content checks of a normalized row
- ``tokenize``: a :class:`TokenizedGroup` per row (a pair is K = 2): prompt ids exactly a prefix of the model
  input, one BOS, one end token, truncation
- ``pipeline``: the two halves every path runs, :func:`~dpokit.data.pipeline.row_outcomes` (each row alone) and
  :func:`~dpokit.data.pipeline.account` (in file order), the :class:`DataReport`, and the in-memory
  :func:`load_preferences` / :func:`load_ranked` / :func:`load_unpaired` over the streaming :func:`iter_tokenized`
- ``cache``: :func:`~dpokit.data.cache.load_cached`, what training and ``dpokit data check`` read a source
  through: tokenized once, then memory-mapped; beside it ``cache_key`` (the key, the integrity check),
  ``cache_build`` (the parallel build), ``cache_shards`` (its workers' files) and ``cache_dataset`` (the
  folder's layout, :class:`~dpokit.data.cache_dataset.TokenizedDataset`)
- ``images`` and ``vision``: rows with images (TRL's ``images`` column, content parts) for a vision-language
  model: images read and checked, tokenized through its processor, pixel inputs carried per group
  (docs/vision.md)
- ``batch``: groups -> tensors in the padded or packed layout ``dpokit.models.logprobs`` scores
- ``overlap``: :func:`find_overlap` between train and eval
- ``check``: the report ``dpokit data check`` prints (the command is ``dpokit.cli.run_check``)
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
