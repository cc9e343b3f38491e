"""What the phantom and the AMOS conversion share: the organs each site annotates and the site dataset folders.

Holds: the organ specification of a site (:data:`OrganSpec`, :func:`resolve_organs`, :func:`organs_per_site`),
the ``--annotate SITE=ORGANS`` syntax (:func:`parse_annotate`), the check that a dataset folder about to be
replaced was written by the same tool (:func:`written_by`, :func:`check_target`), and the safe swap of a
finished folder into place (:func:`writing_folder`, :func:`replace_folder`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from nnunet_feddah.atomic import current_umask
from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.nnunet.datasets import folder_name
from nnunet_feddah.organs import ORGANS, Organ, Task, UnknownOrganError, organ


class SiteSpecError(FedDAHError, ValueError):
    """Bad organs or site numbers for the sites (``--annotate``, ``--sites``); the message names the flag and the fix."""


OrganSpec = str | Task | Iterable[str | int | Organ]


def resolve_organs(spec: OrganSpec) -> tuple[Organ, ...]:
    """``"all"``, a task string such as ``"kidneys+liver"``, a :class:`Task` or organs -> sorted organs."""
    if isinstance(spec, str):
        spec = ORGANS if spec.strip().lower() == "all" else Task.parse(spec)
    organs = tuple(organ(o) for o in (spec.organs if isinstance(spec, Task) else spec))
    if not organs:
        raise SiteSpecError("a site must annotate at least one organ (use 'all' for every AMOS organ)")
    return tuple(sorted(set(organs), key=lambda o: o.label))


def organs_per_site(num_sites: int, annotated: Mapping[int, OrganSpec] | None) -> list[tuple[Organ, ...]]:
    """The organs each of ``num_sites`` sites labels; ``annotated`` maps a 1-based site number (default: all)."""
    if num_sites < 1:
        raise SiteSpecError(f"--sites must be at least 1 (got {num_sites})")
    annotated = dict(annotated or {})
    unknown_sites = sorted(k for k in annotated if not 1 <= k <= num_sites)
    if unknown_sites:
        raise SiteSpecError(f"--annotate names site(s) {unknown_sites} but there are sites 1..{num_sites}")
    return [resolve_organs(annotated.get(i + 1, ORGANS)) for i in range(num_sites)]


def parse_annotate(specs: Sequence[str]) -> dict[int, tuple[Organ, ...]]:
    """``["1=kidneys+liver", "2=all"]`` (repeated ``--annotate SITE=ORGANS``) -> ``{site number: organs}``."""
    result: dict[int, tuple[Organ, ...]] = {}
    for spec in specs:
        site, sep, organs = spec.partition("=")
        if not sep or not site.strip().isdigit() or not organs.strip():
            raise SiteSpecError(f"--annotate {spec!r}: expected SITE=ORGANS, e.g. --annotate 1=kidneys+liver or 2=all")
        if int(site) in result:
            raise SiteSpecError(f"--annotate gives site {int(site)} twice; join the organs with '+' instead")
        try:
            result[int(site)] = resolve_organs(organs)
        except (UnknownOrganError, SiteSpecError) as exc:
            raise SiteSpecError(f"--annotate {spec!r}: {exc}; or 'all'") from None
    return result


def written_by(folder: Path, generator: str) -> bool:
    """True for a dataset folder whose dataset.json says ``feddah.generator == generator`` (so it may be replaced)."""
    try:
        meta = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    block = meta.get("feddah") if isinstance(meta, dict) else None
    return isinstance(block, dict) and block.get("generator") == generator


def check_target(raw_root: Path, dataset_id: int, folder: str, generator: str, *, error: type[Exception],
                 fix_foreign: str, fix_clash: str) -> Path:
    """Refuse to replace a folder ``generator`` did not write, or to add a second folder with the same id.

    Returns ``raw_root / folder``; a refusal raises ``error`` ending in the caller's fix (``fix_foreign``: the
    folder is someone's data; ``fix_clash``: another folder has the id, and nnU-Net finds datasets by id).
    """
    target = raw_root / folder
    if target.exists() and not written_by(target, generator):
        raise error(f"{target} exists and was not written by {generator}; move it away or {fix_foreign}")
    clash = sorted(p.name for p in raw_root.glob(folder_name(dataset_id, "*")) if p.name != folder)
    if clash:
        raise error(f"{raw_root} already has dataset id {dataset_id:03d} ({', '.join(clash)}); nnU-Net finds "
                    f"datasets by id, so {fix_clash}")
    return target


def _temp_folder_beside(target: Path, suffix: str) -> Path:
    """Hidden folder next to ``target`` (same file system, so renames are atomic) with umask permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700 folders; the dataset should be as readable as any other
    return tmp


def replace_folder(finished: Path, target: Path) -> None:
    """Move a completely written folder to ``target``; an existing ``target`` is swapped out, then deleted.

    Readers see the old folder or the new one, never a half-written mix (a dataset folder being regenerated).
    """
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(finished, target)
        shutil.rmtree(old)
    else:
        os.replace(finished, target)


@contextmanager
def writing_folder(target: Path) -> Iterator[Path]:
    """Yield a hidden folder beside ``target`` to write into; it replaces ``target`` only if the block completes.

    A crash or an error leaves ``target`` as it was (a previous dataset stays whole) and removes the partial
    folder, so nnU-Net never picks up half a dataset.
    """
    tmp = _temp_folder_beside(target, ".tmp")
    try:
        yield tmp
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
