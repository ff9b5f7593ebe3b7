"""The ecosystem edge: ``hub`` (Hub-ready model folders, the model card, ``dpokit export``), ``from_trl`` with
``from_trl_loss`` and ``from_trl_script`` (``dpokit config from-trl``), ``trackers`` (TensorBoard, W&B,
MLflow, Trackio).
"""
