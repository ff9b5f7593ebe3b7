"""RLHF with PPO: the trainer (``dpokit.ppo.trainer``) and its math as pure functions (``dpokit.ppo.core``)."""

from dpokit.ppo.trainer import PolicyValue, ppo

__all__ = ["PolicyValue", "ppo"]
