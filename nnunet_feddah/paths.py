"""Where things live: the nnU-Net environment variables, the external-trainer folder, bundled plans.

nnU-Net 2.8.1 reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` lazily (on every use), so
they may be set or changed after importing nnunetv2; :func:`nnunet_env` is the one place that knows the
layout of a FedDAH work folder.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path

NNUNET_DIR_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
CONFIGURATION = "3d_fullres"  # the one nnU-Net configuration every site trains, exports and predicts with


def ext_trainer_dir() -> Path:
    """The folder holding ``FedDAHTrainer.py`` for ``nnUNet_extTrainer`` (editable or installed)."""
    return Path(str(resources.files("nnunet_feddah.ext_trainers")))


def bundled_plans_dir() -> Path:
    """The folder with the shipped plans templates and federation plans (repository ``plans/``)."""
    return Path(str(resources.files("nnunet_feddah.bundled_plans")))


def nnunet_env(root: os.PathLike | str) -> dict[str, str]:
    """Environment for a work folder: nnU-Net's three folders under ``root`` plus CPU-friendly defaults."""
    root = Path(root).resolve()
    env = {
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_extTrainer": str(ext_trainer_dir()),
        # small machines: no augmentation worker processes, two preprocessing workers, no torch.compile
        "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0"),
        "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", "2"),
        "nnUNet_compile": os.environ.get("nnUNet_compile", "false"),
    }
    return env


def require_nnunet_env(*names: str) -> dict[str, Path]:
    """Return the requested nnU-Net folders, or raise one error naming every missing variable and the fix."""
    names = names or NNUNET_DIR_VARS
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise OSError(
            f"environment variable(s) {', '.join(missing)} not set. nnU-Net needs them to find its data. "
            f"Fix: eval \"$(nnfeddah env --root <work folder>)\" (or export them by hand, see docs/INSTALL.md)"
        )
    return {n: Path(os.environ[n]) for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnfeddah")
    sub = parser.add_subparsers(dest="cmd", required=True)
    env_p = sub.add_parser("env", help="print export lines for a work folder")
    env_p.add_argument("--root", required=True, help="work folder that holds nnUNet_raw/_preprocessed/_results")
    sub.add_parser("ext-trainer-path", help="print the folder for nnUNet_extTrainer")
    args = parser.parse_args(argv)
    if args.cmd == "ext-trainer-path":
        print(ext_trainer_dir())
    else:
        for key, value in nnunet_env(args.root).items():
            print(f"export {key}={value!r}".replace("'", '"'))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
