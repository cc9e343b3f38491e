"""nnunet-feddah: federated continual learning for nnU-Net v2 with a Dynamic Allocation Hypernetwork."""

__version__ = "0.1.0"
