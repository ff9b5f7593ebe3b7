"""dpokit: Direct Preference Optimization for causal language models.

Python API (the CLI is a thin layer over it)::

    import dpokit
    run_dir = dpokit.train("configs/tiny.yaml", train__max_steps=10)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "load_config", "LOSSES"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import dpokit` and `dpokit --help` stay fast (torch and transformers are heavy).
    if name == "train":
        from dpokit.train import train

        return train
    if name == "load_config":
        from dpokit.config import load_config

        return load_config
    if name == "LOSSES":
        from dpokit.losses import LOSSES

        return LOSSES
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
