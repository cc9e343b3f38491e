"""The results room: what a finished federation is worth and how to use it.

Holds: :mod:`.amos_channels` (task heads in the AMOS channel space), :mod:`.nnunet_folder` (nnU-Net's
results-folder and checkpoint format), :mod:`.export` (every task of a state as an nnU-Net model
folder), :mod:`.inference`, :mod:`.merge` and :mod:`.predict` (all tasks on an image, merged into one AMOS
label map), :mod:`.evaluate`, :mod:`.fcl_metrics` and :mod:`.report` (Dice matrix over time, forgetting,
BWT, plots; :mod:`.stats` for means, 95 % intervals and paired differences over seeds), :mod:`.compare`
(another strategy over a finished federation's uploads) with :mod:`.replay` (site jobs replayed instead of
trained again). The benchmark instruments live in :mod:`nnunet_feddah.research`.

May import: ``nnunet``, ``method``, ``federation``, ``data`` and the base modules. Never Flower, never research.
"""
