"""nnunet-feddah: federated continual learning for nnU-Net v2 with a Dynamic Allocation Hypernetwork.

The package is six rooms, each a subpackage with one concern; imports run one way (an arrow means
"may import"):

    entry points (cli, coordinate, site)
        -> results/     export, inference, merged prediction, evaluation, FCL metrics, reports, benchmark
        -> flower/      the only place ``flwr`` is imported: ServerApp/ClientApp adapters, launchers
        -> data/        the AMOS-like phantom cohort and the AMOS22 conversion
        -> federation/  the plan, the round loop, checkpoints, the site round
        -> nnunet/      everything that trains with nnunetv2: network, weights, trainer, augmentation
        -> method/      DAHyper, AMR and the server strategies in plain torch (no nnU-Net, Flower, plan format)
        -> base modules at this level: organs, atomic, tensor_checks, tensor_file, paths, errors

``method`` and ``nnunet`` do not import each other; ``federation`` uses ``method`` everywhere and ``nnunet``
only for the site side (site round, site-data check); ``results`` may use every room below it except
``flower``. The base modules import only the standard library, torch/safetensors and each other.
"""

__version__ = "0.1.0"
