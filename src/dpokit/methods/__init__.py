"""The kinds of training beyond the DPO step itself: ``reward_model`` (``dpokit rm``, a Bradley-Terry reward
model), ``online`` (online and semi-online DPO on the policy's own samples), ``ppo`` (RLHF's baseline), and
``rollout``, the sampling and scoring that online DPO and PPO share.
"""
