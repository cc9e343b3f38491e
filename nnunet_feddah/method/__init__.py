"""The algorithm room: DAHyper, AMR, hypernetwork checkpoints and the server strategies, in plain torch.

Holds: :mod:`.dahyper` (task embeddings -> per-layer codes -> generated weights), :mod:`.amr` (the server
update ``L_task + β·L_R``, the round's aggregation), :mod:`.aggregate` (how a round's uploads combine),
:mod:`.similarity` (W_s and the divergences behind it), :mod:`.hypernet_file` (DAHyper checkpoints),
:mod:`.strategy` (the abstract :class:`~.strategy.Strategy` every server strategy obeys), one module per
strategy family (:mod:`.feddah`, :mod:`.fedavg`), :mod:`.donor` (which trained task a new task starts
from, shared by FedDAH and the donor-initialised per-task baseline) and :mod:`.registry` (names, aliases, ablations, how a
strategy is made, saved and loaded).

May import: torch, numpy, safetensors, the standard library and the base modules of ``nnunet_feddah``
(``organs``, ``atomic``, ``tensor_checks``, ``tensor_file``, ``errors``). Never nnU-Net, Flower or the
federation plan format: it takes and returns tensors keyed by parameter name, so it is tested in seconds.
"""
