"""The training core: what every kind of training shares.

``kinds`` is the table of kinds of training and ``choose_kind``, which picks one from the command and the
config; ``setup`` builds a ``Run`` from a kind's ``KindSpec`` (config -> models -> data -> reference ->
optimizer) and holds ``restore``, ``save`` and ``export_final``; ``loop`` runs the steps (log, evaluate,
checkpoint, stop on a signal); ``step`` advances a run by one optimizer step of a ``Task`` (forward -> loss ->
backward -> update);
``resume`` and ``checkpoint`` make a stopped run continue exactly; ``preempt`` turns SIGTERM into a checkpoint;
``distributed`` is what differs under torchrun (DDP / FSDP2, each rank's share, reductions); ``reference`` is
where reference log-probs come from; ``metrics`` names and writes the numbers a step logs; ``optim8bit`` is
the 8-bit AdamW. Nothing here imports a kind of training (``dpokit.methods``): each registers itself in
``kinds``.
"""
