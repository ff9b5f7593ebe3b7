"""The training core: what every kind of training shares.

``setup`` builds a ``Run`` (config -> models -> data -> reference -> optimizer) and holds ``restore``, ``save``
and ``export_final``; ``step`` advances a run by one optimizer step (forward -> loss -> backward -> update);
``resume`` and ``checkpoint`` make a stopped run continue exactly; ``preempt`` turns SIGTERM into a checkpoint;
``distributed`` is what differs under torchrun (DDP / FSDP2, each rank's share, reductions); ``reference`` is
where reference log-probs come from; ``metrics`` names and writes the numbers a step logs; ``optim8bit`` is
the 8-bit AdamW. Nothing here imports a kind of training (``dpokit.methods``).
"""
