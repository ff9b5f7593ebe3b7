"""RLHF with PPO: the trainer (``dpokit.methods.ppo.trainer``) and its math as pure functions (``dpokit.methods.ppo.core``)."""

from dpokit.methods.ppo.trainer import PolicyValue, ppo

__all__ = ["PolicyValue", "ppo"]
