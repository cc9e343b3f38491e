"""The nnU-Net room: everything that trains with nnunetv2.

Holds: :mod:`.network` (the shared network built from plans and its unique tensors), :mod:`.weights`
(weight files), :mod:`.datasets` (dataset id <-> name), :mod:`.round_config` (what a site asks one round
to do), :mod:`.task_data` (task labels and data), :mod:`.validation` (per-organ Dice), :mod:`.shared_plans`
(one architecture for every site + preprocessing), :mod:`.trainer` (``FedDAHTrainer``) and
:mod:`.augment` (nnU-Net's training augmentation on the training device), :mod:`.federated_fingerprint`
(a site's releasable dataset statistics, planning from their merge) and :mod:`.fingerprint_merge` (the
merge algebra: guarded histograms, exact sums, bounded percentiles).

May import: nnunetv2 and its dependencies, torch, the base modules of ``nnunet_feddah`` and ``method``
(only the trainer, to generate a round's start weights from a DAHyper checkpoint). Never ``federation``,
``flower``, ``data`` or ``results``.
"""
