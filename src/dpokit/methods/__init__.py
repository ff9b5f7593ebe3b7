"""The kinds of training, one module each: ``dpo`` (DPO and its variants, ``dpokit train``), ``kto`` (an
unpaired loss), ``sft`` (``dpokit sft``), ``reward_model`` (``dpokit rm``, a Bradley-Terry reward model),
``online`` (online and semi-online DPO on the policy's own samples), ``ppo`` (RLHF's baseline), and ``rollout``,
the sampling and scoring that online DPO and PPO share.

Each registers its ``Kind`` in ``dpokit.training.kinds`` when imported; importing this package imports them
all, which ``dpokit.api`` (and so ``import dpokit``) does before any training runs.
"""

from dpokit.methods import dpo, kto, online, reward_model, sft
from dpokit.methods.ppo import trainer

__all__ = ["dpo", "kto", "online", "reward_model", "sft", "trainer"]
