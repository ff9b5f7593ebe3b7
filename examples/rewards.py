"""An example reward function for ``ppo.reward`` / ``--reward``: ``examples/rewards.py:letter_e``.

A reward is any ``f(prompt: str, response: str) -> float`` (higher is better). This one counts the letter "e"
in the response: a target a tiny random model can learn in seconds, which makes it the reward of
``configs/tiny-ppo.yaml`` and of the PPO tests.
"""


def letter_e(prompt: str, response: str) -> float:
    return float(response.count("e"))
