"""nnU-Net reads its folder variables lazily, so one process can train sites with different nnU-Net roots.

Issue 11 item 4: the old "one process per nnU-Net root" rule assumed nnU-Net froze ``nnUNet_raw`` & co. at
import. nnunetv2 2.8.1 does not: these tests keep that true (and would fail on a version that froze them).
"""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

from nnunet_feddah.nnunet.datasets import DatasetNotFoundError, dataset_name, dataset_under, nnunet_folders

FOLDER_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _root(tmp_path: Path, label: str, dataset: str) -> dict[str, Path]:
    folders = {v: tmp_path / label / v for v in FOLDER_VARS}
    for folder in folders.values():
        folder.mkdir(parents=True)
    (folders["nnUNet_raw"] / dataset).mkdir()
    return folders


def test_nnunet_resolves_datasets_under_whatever_the_environment_says_now(tmp_path, monkeypatch):
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    a = _root(tmp_path, "a", "Dataset601_SiteA")
    b = _root(tmp_path, "b", "Dataset601_SiteB")
    for var in FOLDER_VARS:
        monkeypatch.setenv(var, str(a[var]))
    paths = importlib.import_module("nnunetv2.paths")  # imported (again) while the variables point at a
    assert maybe_convert_to_dataset_name(601) == "Dataset601_SiteA"
    for var in FOLDER_VARS:
        monkeypatch.setenv(var, str(b[var]))
    assert maybe_convert_to_dataset_name(601) == "Dataset601_SiteB"
    assert os.fspath(paths.nnUNet_raw) == str(b["nnUNet_raw"])


def test_no_nnunet_module_uses_the_folder_variables_at_import():
    """A module- or class-level use of nnUNet_raw/_preprocessed/_results would freeze the value at import."""
    import nnunetv2

    frozen = []
    for file in Path(nnunetv2.__file__).parent.rglob("*.py"):
        tree = ast.parse(file.read_text(), str(file))
        bodies = [tree.body] + [node.body for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
        for body in bodies:
            for stmt in body:
                if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                if file.name == "paths.py" or _is_main_guard(stmt):  # the wrappers themselves; script-only code
                    continue
                used = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)} & set(FOLDER_VARS)
                if used:
                    frozen.append(f"{file}:{stmt.lineno} {sorted(used)}")
    assert not frozen, frozen


def _is_main_guard(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare)
            and isinstance(stmt.test.left, ast.Name) and stmt.test.left.id == "__name__")


def test_nnunet_folders_switches_and_restores(tmp_path, monkeypatch):
    a = _root(tmp_path, "a", "Dataset602_SiteA")
    b = _root(tmp_path, "b", "Dataset602_SiteB")
    for var in FOLDER_VARS:
        monkeypatch.setenv(var, str(a[var]))
    assert dataset_name(602) == "Dataset602_SiteA"
    with nnunet_folders(b):
        assert dataset_name(602) == "Dataset602_SiteB"
        assert os.environ["nnUNet_raw"] == str(b["nnUNet_raw"])
    assert os.environ["nnUNet_raw"] == str(a["nnUNet_raw"])
    assert dataset_name("602", {"nnUNet_raw": b["nnUNet_raw"]}) == "Dataset602_SiteB"
    assert os.environ["nnUNet_preprocessed"] == str(a["nnUNet_preprocessed"])  # unset only inside
    (b["nnUNet_preprocessed"] / "Dataset603_X").mkdir()
    (b["nnUNet_preprocessed"] / "Dataset603_Y").mkdir()
    with pytest.raises(DatasetNotFoundError, match="603.*ambiguous"):
        dataset_name(603, b)
    with pytest.raises(DatasetNotFoundError, match="'604' not found"):
        dataset_name("604", b)
    with pytest.raises(DatasetNotFoundError, match="neither an id"):
        dataset_name("six")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        dataset_under("Dataset605_Z", b["nnUNet_preprocessed"])
    assert dataset_under(602, b["nnUNet_raw"], "nnUNet_raw") == "Dataset602_SiteB"
