"""nnU-Net's training augmentation on whole batches on the training device (docs/AUGMENTATION.md).

Holds: :mod:`.batch_transforms` (the transforms in torch), :mod:`.device_augment` (parameter draws and the
batch augmenter) and :mod:`.settings` (probabilities and ranges read off nnU-Net's own pipeline).
May import: torch, batchgeneratorsv2 (settings only: to read nnU-Net's pipeline) and the base modules.
"""
