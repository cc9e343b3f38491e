"""Dataset ids and names: the one place that turns ``501`` into ``Dataset501_FedDAHPhantomSite1`` and back.

Resolution is nnU-Net's own (:func:`maybe_convert_to_dataset_name`: candidates in nnUNet_raw,
nnUNet_preprocessed and nnUNet_results), so our tools find exactly the datasets ``nnUNetv2_*`` finds.
nnU-Net 2.8.1 reads its folder variables lazily (``nnunetv2.paths._EnvPath`` looks at ``os.environ`` on
every use; tests/test_site_round.py checks it), so a lookup under another site's folders only has to set
the variables for its duration (:func:`nnunet_folders`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id, maybe_convert_to_dataset_name

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.paths import NNUNET_DIR_VARS

DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_.-]+$")


class DatasetNotFoundError(FedDAHError, ValueError):
    """A dataset id that names no dataset folder, or more than one."""


def folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset: ``Dataset###_Name``."""
    return f"Dataset{dataset_id:03d}_{name}"


def dataset_id(dataset: int | str) -> int | None:
    """The id of ``501``, ``"501"`` or ``"Dataset501_X"``; None for anything else."""
    text = str(dataset)
    if text.isdigit():
        return int(text)
    return convert_dataset_name_to_id(text) if DATASET_NAME.match(text) else None


@contextmanager
def nnunet_folders(folders: Mapping[str, os.PathLike | str] | None) -> Iterator[None]:
    """Make nnU-Net see exactly ``folders`` (nnUNet_raw/_preprocessed/_results; absent ones unset) for a while.

    ``None`` leaves the environment as it is. The previous values are restored afterwards.
    """
    if folders is None:
        yield
        return
    previous = {name: os.environ.get(name) for name in NNUNET_DIR_VARS}
    try:
        for name in NNUNET_DIR_VARS:
            if folders.get(name) is not None:
                os.environ[name] = str(folders[name])
            else:
                os.environ.pop(name, None)
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def dataset_name(dataset: int | str, folders: Mapping[str, os.PathLike | str] | None = None) -> str:
    """``501`` or ``Dataset501_X`` -> the dataset's folder name, found by nnU-Net under ``folders``.

    ``folders`` default to the nnUNet_* environment variables. Not found or ambiguous raises
    :class:`DatasetNotFoundError` naming the folders searched.
    """
    text = str(dataset)
    if DATASET_NAME.match(text):
        return text
    if dataset_id(text) is None:
        raise DatasetNotFoundError(f"dataset {dataset!r} is neither an id (e.g. 501) nor a name (Dataset501_Name)")
    with nnunet_folders(folders):
        searched = ", ".join(f"{n}={os.environ.get(n)}" for n in NNUNET_DIR_VARS if os.environ.get(n))
        try:
            return str(maybe_convert_to_dataset_name(int(text)))
        except RuntimeError as exc:
            what = "ambiguous (more than one folder has this id)" if "More than one" in str(exc) else "not found"
            raise DatasetNotFoundError(f"dataset {dataset!r} {what} in {searched or 'no nnU-Net folder (none set)'}. "
                                       f"Fix: write the site dataset (e.g. `nnfeddah phantom`) or correct the id "
                                       f"/ nnunet_root") from None


def dataset_under(dataset: int | str, root: os.PathLike | str, variable: str = "nnUNet_preprocessed") -> str:
    """The name of ``dataset`` resolved in one nnU-Net folder (``variable`` says which), whose folder must exist."""
    name = dataset_name(dataset, {variable: root})
    if not (Path(root) / name).is_dir():
        raise DatasetNotFoundError(f"dataset {name}: {Path(root) / name} does not exist. Fix: install the shared "
                                   f"plans for it (`nnfeddah plans install --plans-file <shared plans> -d {dataset}`)")
    return name
