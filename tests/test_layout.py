"""The package's rooms and the direction of their imports (issue 11), checked on the source itself.

Read with ``ast``, nothing is imported: a module-level or a lazy (function-level) import counts the same,
because a lazy import that runs the wrong way is still a dependency the wrong way.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import nnunet_feddah

PACKAGE = Path(nnunet_feddah.__file__).parent
ENTRY_POINTS = {"cli", "coordinate", "site"}
# room -> the rooms it may import ("base" = the shared top-level modules)
ALLOWED = {
    "base": {"base"},
    "method": {"base", "method"},
    "nnunet": {"base", "method", "nnunet"},  # the trainer generates its start weights from a DAHyper checkpoint
    "federation": {"base", "method", "nnunet", "federation"},
    "data": {"base", "nnunet", "federation", "data"},
    "results": {"base", "method", "nnunet", "federation", "data", "results"},
    "research": {"base", "method", "nnunet", "federation", "data", "results", "research"},
    "flower": {"base", "federation", "flower"},
}
# federation modules that must work without nnU-Net (the coordinator reads plans and runs rounds without it)
NO_NNUNET = {"federation/coordinator.py", "federation/plan.py", "federation/plan_reader.py",
             "federation/checkpoint.py", "federation/logfile.py", "federation/lock.py"}
METHOD_THIRD_PARTY = {"torch", "numpy", "safetensors"}


def _modules() -> dict[str, Path]:
    return {str(p.relative_to(PACKAGE)): p for p in PACKAGE.rglob("*.py")}


def _room(rel: str) -> str:
    first = rel.split("/")[0]
    if first.endswith(".py"):
        return "entry" if first[:-3] in ENTRY_POINTS else "base"
    return first


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "nnunet_feddah":  # from nnunet_feddah import organs
                names += [f"nnunet_feddah.{a.name}" for a in node.names]
    return names


def _target_room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "nnunet_feddah" or len(parts) == 1:
        return None
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "entry" if parts[1] in ENTRY_POINTS else "base"


def test_rooms_import_one_way():
    wrong = []
    for rel, path in _modules().items():
        room = _room(rel)
        if room == "entry":
            continue
        for module in _imports(path):
            target = _target_room(module)
            if target is not None and target not in ALLOWED[room]:
                wrong.append(f"{rel} ({room}) imports {module} ({target})")
    assert not wrong, "\n".join(wrong)


def test_no_two_rooms_import_each_other():
    edges = {(_room(rel), _target_room(m)) for rel, path in _modules().items() for m in _imports(path)}
    edges = {(a, b) for a, b in edges if b is not None and a != b}
    assert not [(a, b) for a, b in edges if (b, a) in edges]


def test_method_is_plain_torch():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = [f"{rel}: {m}" for rel, path in _modules().items() if rel.startswith("method/") for m in _imports(path)
           if m.split(".")[0] not in stdlib | METHOD_THIRD_PARTY | {"nnunet_feddah"}]
    assert not bad, bad


def test_flower_only_in_flower_and_nnunet_not_in_the_coordinator_side():
    flwr = [rel for rel, path in _modules().items() if not rel.startswith("flower/")
            and any(m.split(".")[0] == "flwr" for m in _imports(path))]
    assert not flwr, flwr
    nnunet = [rel for rel, path in _modules().items() if (rel.startswith("method/") or rel in NO_NNUNET)
              and any(m.split(".")[0] == "nnunetv2" or m.startswith("nnunet_feddah.nnunet") for m in _imports(path))]
    assert not nnunet, nnunet


#: Modules allowed over MAX_LINES, each with its reason; an entry that is no longer long must go.
MAX_LINES = 400
LONG_MODULES = {
    "data/amos.py": "one conversion whose steps feed each other through its own case and site types",
    "data/anatomy.py": "one _Builder draws a patient from one random stream in a fixed order",
    "results/report.py": "the schema check, the seed aggregation, the table and the plots read one report layout",
}


def test_modules_stay_short_unless_listed_with_a_reason():
    lines = {rel: path.read_text().count("\n") for rel, path in _modules().items()}
    long = [f"{rel}: {n} lines" for rel, n in lines.items() if n > MAX_LINES and rel not in LONG_MODULES]
    assert not long, f"over {MAX_LINES} lines, and not in LONG_MODULES with a reason: {long}"
    stale = [rel for rel in LONG_MODULES if lines.get(rel, 0) <= MAX_LINES]
    assert not stale, f"LONG_MODULES entries that are no longer long (remove them): {stale}"


def test_every_room_says_what_it_holds_and_may_import():
    for room in ("method", "nnunet", "federation", "flower", "data", "results", "research"):
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text())) or ""
        assert "Holds" in doc or "holds" in doc or "only package" in doc, room
        assert "import" in doc, room


def test_the_readme_room_table_names_every_module():
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## What is here"):readme.index("## What the coordinator holds")]
    named = set(re.findall(r"`([a-z_]+)`", section))
    missing = [rel for rel in _modules() if not rel.endswith("__init__.py") and Path(rel).stem not in named]
    assert not missing, f"README.md's room table does not name: {missing}"
