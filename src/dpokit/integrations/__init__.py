"""The ecosystem edge: ``hub`` (Hub-ready model folders, the model card, a LoRA adapter's card), ``export``
(``dpokit export``: a run's model folder, or its LoRA adapter with ``--adapter``), ``from_trl`` with
``from_trl_loss`` and ``from_trl_script`` (``dpokit config from-trl``), ``trackers`` (TensorBoard, W&B,
MLflow, Trackio).
"""
