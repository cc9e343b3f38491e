"""``nnfeddah``: one entry point whose sub-commands are the ``python -m nnunet_feddah.<module>`` tools."""

from __future__ import annotations

import importlib
import sys

#: sub-command -> (module whose ``main(argv)`` runs it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("nnunet_feddah.paths", "print the environment variables for a work folder (eval \"$(nnfeddah env --root DIR)\")"),
    "ext-trainer-path": ("nnunet_feddah.paths", "print the folder to put in nnUNet_extTrainer"),
    "phantom": ("nnunet_feddah.data.phantom", "write the AMOS-like phantom cohort as nnU-Net raw datasets"),
    "plans": ("nnunet_feddah.nnunet.shared_plans", "install a shared plans template into every site and preprocess"),
    "fingerprint": ("nnunet_feddah.nnunet.federated_fingerprint", "a site's releasable dataset statistics, or the "
                                                                  "merge of every site's into one nnU-Net fingerprint"),
    "amos": ("nnunet_feddah.data.amos", "convert an extracted AMOS22 download into FedDAH site datasets (+ shared plans)"),
    "export": ("nnunet_feddah.results.export", "write every task of a coordinator state as an nnU-Net results folder "
                                       "(nnUNetv2_predict ... -chk <task>.pth)"),
    "predict": ("nnunet_feddah.results.predict", "run every exported task on images and merge into one AMOS label map"),
    "evaluate": ("nnunet_feddah.results.evaluate", "Dice matrix over time steps, forgetting, BWT, report.json + plots of a "
                                           "coordinator state"),
    "compare": ("nnunet_feddah.results.compare", "replay a finished federation under another strategy (default fedavg) "
                                                 "and show both side by side"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: nnfeddah <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    if name in ("env", "ext-trainer-path"):
        return module.main([name, *rest])
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
