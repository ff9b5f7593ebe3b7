"""Evaluation: the policy as a reward model, KL(pi || pi_ref), ground-truth reward, win rate, the reward-KL
frontier, and the HTML report.

- ``scoring``: :func:`score` / :func:`score_rows`: implicit reward r(x, y) = beta * log pi(y|x) / pi_ref(y|x)
- ``stats``: the estimators (KL with standard error, Wilson intervals for win rates)
- ``run``: :func:`evaluate_run`, behind ``dpokit eval``
- ``report``: :func:`write_report`, behind ``dpokit report``
"""

from __future__ import annotations

from typing import Any

__all__ = ["Scorer", "evaluate_run", "load_scorer", "score", "score_rows", "write_report"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `dpokit report` (matplotlib only) does not import torch and transformers.
    if name in ("Scorer", "load_scorer", "score", "score_rows"):
        from dpokit.evaluate import scoring

        return getattr(scoring, name)
    if name == "evaluate_run":
        from dpokit.evaluate.run import evaluate_run

        return evaluate_run
    if name == "write_report":
        from dpokit.evaluate.report import write_report

        return write_report
    raise AttributeError(f"module 'dpokit.evaluate' has no attribute {name!r}")
