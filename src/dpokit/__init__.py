"""dpokit: Direct Preference Optimization for causal language models.

Python API (the CLI is a thin layer over it)::

    import dpokit
    run_dir = dpokit.train("configs/tiny.yaml", train__max_steps=10)
    sft_dir = dpokit.sft("configs/tiny.yaml", run_dir="runs/tiny-sft")
    rm_dir = dpokit.rm("configs/tiny-rm.yaml")                        # a Bradley-Terry reward model
    rows = dpokit.score(run_dir, "examples/prefs-tiny-eval.jsonl")   # implicit rewards

Objects in memory instead of paths, as TRL users write (``dpokit.api``)::

    run_dir = dpokit.train({"loss": {"beta": 0.1}, "run_dir": "runs/mem"}, model=model, tokenizer=tokenizer,
                           train_data=dataset)   # a datasets.Dataset, a list of dicts or a pandas DataFrame
"""

from __future__ import annotations

# ``dpokit.api`` imports ``dpokit.methods``, whose modules register the kinds of training.
from dpokit.api import rm, sft, train  # noqa: E402
from dpokit.config import load_config  # noqa: E402
from dpokit.evaluate.scoring import score  # noqa: E402
from dpokit.losses import LOSSES  # noqa: E402
from dpokit.version import __version__  # noqa: E402

__all__ = ["LOSSES", "__version__", "load_config", "rm", "score", "sft", "train"]
