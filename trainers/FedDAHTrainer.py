"""nnU-Net finds external trainers by scanning the folders in ``nnUNet_extTrainer``.

This file only re-exports the trainer so that ``nnUNetv2_train ... -tr FedDAHTrainer`` works with an
unmodified nnunetv2 install. Get the folder with ``nnfeddah ext-trainer-path``.
"""

from nnunet_feddah.nnunet.trainer import FedDAHTrainer

__all__ = ["FedDAHTrainer"]
