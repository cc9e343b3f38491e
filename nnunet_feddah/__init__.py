"""nnunet-feddah: federated continual learning for nnU-Net v2 with a Dynamic Allocation Hypernetwork.

The package is six rooms, each a subpackage with one concern, listed from the top of the import graph
to its bottom: a room imports only rooms below it (which ones, is said underneath).

    entry points (cli, coordinate, site)
        -> results/     export, inference, merged prediction, evaluation, FCL metrics, reports, benchmark
        -> flower/      the only place ``flwr`` is imported: ServerApp/ClientApp adapters, launchers
        -> data/        the AMOS-like phantom cohort and the AMOS22 conversion
        -> federation/  the plan, the round loop, checkpoints, the site round
        -> nnunet/      everything that trains with nnunetv2: network, weights, trainer, augmentation
        -> method/      DAHyper, AMR and the server strategies in plain torch (no nnU-Net, Flower, plan format)
        -> base modules at this level: organs, atomic, tensor_checks, tensor_file, paths, errors

``method`` imports no other room; ``nnunet`` uses ``method`` only in the trainer (start weights generated
from a DAHyper checkpoint); ``federation`` uses ``method`` everywhere and ``nnunet`` only for the site side
(site round, site-data check, the start network); ``flower`` uses ``federation`` only; ``results`` may use
every room below it except ``flower``. The base modules import only the standard library,
torch/safetensors and each other. tests/test_layout.py keeps all of this true.
"""

__version__ = "0.1.0"
