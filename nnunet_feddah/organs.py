"""The AMOS22 organ catalogue and organ *tasks*.

Everything in nnunet-feddah speaks AMOS label ids (1–15). Real AMOS ``dataset.json`` files, the
phantom cohort and converted site datasets all declare the same ids, so a task such as
``kidneys`` means the same voxels at every site. Names are matched leniently (case, spaces,
underscores, hyphens and slashes are ignored) so AMOS's own spellings — including its ``arota``
typo — map cleanly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

from nnunet_feddah.errors import FedDAHError


@dataclass(frozen=True)
class Organ:
    """One AMOS22 structure: its label id, a canonical key and the spellings found in the wild."""

    label: int
    key: str
    name: str
    amos_spelling: str
    aliases: tuple[str, ...] = ()

    def spellings(self) -> tuple[str, ...]:
        return (self.key, self.name, self.amos_spelling, *self.aliases)


ORGANS: tuple[Organ, ...] = (
    Organ(1, "spleen", "spleen", "spleen"),
    Organ(2, "right_kidney", "right kidney", "right kidney", ("kidney_right", "rk")),
    Organ(3, "left_kidney", "left kidney", "left kidney", ("kidney_left", "lk")),
    Organ(4, "gallbladder", "gall bladder", "gall bladder", ("gallbladder",)),
    Organ(5, "esophagus", "esophagus", "esophagus", ("oesophagus",)),
    Organ(6, "liver", "liver", "liver"),
    Organ(7, "stomach", "stomach", "stomach"),
    Organ(8, "aorta", "aorta", "arota"),
    Organ(9, "postcava", "postcava", "postcava", ("ivc", "inferior vena cava", "vena cava")),
    Organ(10, "pancreas", "pancreas", "pancreas"),
    Organ(11, "right_adrenal_gland", "right adrenal gland", "right adrenal gland", ("adrenal_gland_right", "rag")),
    Organ(12, "left_adrenal_gland", "left adrenal gland", "left adrenal gland", ("adrenal_gland_left", "lag")),
    Organ(13, "duodenum", "duodenum", "duodenum"),
    Organ(14, "bladder", "bladder", "bladder", ("urinary bladder",)),
    Organ(15, "prostate_uterus", "prostate/uterus", "prostate/uterus", ("prostate", "uterus", "prostate,uterus")),
)

#: The label value (and first output channel of every task network) of everything that is no organ.
BACKGROUND = 0

#: Named organ groups usable as task names. Order inside a group is the output-channel order.
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "kidneys": ("right_kidney", "left_kidney"),
    "adrenal_glands": ("right_adrenal_gland", "left_adrenal_gland"),
    "great_vessels": ("aorta", "postcava"),
}

BY_LABEL: dict[int, Organ] = {o.label: o for o in ORGANS}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-/,]+", "", name.strip().lower())


_BY_SPELLING: dict[str, Organ] = {_normalise(s): o for o in ORGANS for s in o.spellings()}


class UnknownOrganError(FedDAHError, ValueError):
    """Raised for an organ or task name that is not in the AMOS catalogue."""


def known_names() -> str:
    organs = ", ".join(o.key for o in ORGANS)
    groups = ", ".join(f"{k} ({'+'.join(v)})" for k, v in TASK_GROUPS.items())
    return f"organs: {organs}; groups: {groups}"


def organ(name_or_label: Union[str, int, Organ]) -> Organ:
    """Look an organ up by AMOS label id, canonical key, display name, AMOS spelling or alias."""
    if isinstance(name_or_label, Organ):
        return name_or_label
    if isinstance(name_or_label, int) or (isinstance(name_or_label, str) and name_or_label.strip().isdigit()):
        label = int(name_or_label)
        if label not in BY_LABEL:
            raise UnknownOrganError(f"AMOS label id {label} does not exist (valid ids: 1-15). Known {known_names()}")
        return BY_LABEL[label]
    found = _BY_SPELLING.get(_normalise(str(name_or_label)))
    if found is None:
        raise UnknownOrganError(f"unknown organ {name_or_label!r}. Known {known_names()}")
    return found


@dataclass(frozen=True)
class Task:
    """An ordered set of organs that is learnt together. Output channel i+1 is ``organs[i]``."""

    organs: tuple[Organ, ...]

    def __post_init__(self) -> None:
        if not self.organs:
            raise UnknownOrganError("a task needs at least one organ")
        labels = [o.label for o in self.organs]
        if len(set(labels)) != len(labels):
            raise UnknownOrganError(f"task lists an organ twice: {'+'.join(o.key for o in self.organs)}")

    @property
    def key(self) -> str:
        """Stable identifier: a group name when the organs are exactly that group, else keys joined by '+'."""
        keys = tuple(o.key for o in self.organs)
        for group, members in TASK_GROUPS.items():
            if members == keys:
                return group
        return "+".join(keys)

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(o.label for o in self.organs)

    @property
    def num_outputs(self) -> int:
        """Network outputs for this task: background plus one per organ."""
        return len(self.organs) + 1

    def nnunet_labels(self) -> dict[str, int]:
        """The ``labels`` block of an nnU-Net dataset.json for this task (consecutive ids)."""
        out = {"background": 0}
        out.update({o.name: i + 1 for i, o in enumerate(self.organs)})
        return out

    def amos_to_task_lut(self) -> list[int]:
        """Lookup table (index = AMOS id 0..15) giving this task's channel; organs outside the task -> 0."""
        lut = [0] * (max(BY_LABEL) + 1)
        for i, o in enumerate(self.organs):
            lut[o.label] = i + 1
        return lut

    def __str__(self) -> str:
        return self.key

    @classmethod
    def parse(cls, spec: Union[str, Task, Sequence[Union[str, int, Organ]]]) -> Task:
        """Parse ``"kidneys"``, ``"spleen+pancreas"``, ``"kidneys+liver"`` or a list of organs / groups."""
        if isinstance(spec, Task):
            return spec
        parts = [p for p in spec.split("+") if p.strip()] if isinstance(spec, str) else list(spec)
        organs: list[Organ] = []
        for part in parts:
            if isinstance(part, str) and _normalise(part) in {_normalise(g) for g in TASK_GROUPS}:
                group = next(g for g in TASK_GROUPS if _normalise(g) == _normalise(part))
                organs.extend(organ(k) for k in TASK_GROUPS[group])
            else:
                organs.append(organ(part))
        return cls(tuple(organs))


def organs_in_dataset_json(dataset_json: Mapping) -> dict[int, Organ]:
    """Map a dataset.json ``labels`` block (nnU-Net v2 ``name -> id`` or AMOS/MSD ``id -> name``) to organs.

    Every declared foreground label must be an AMOS organ *with its AMOS id*; anything else is refused
    because a silent renumbering would make tasks mean different voxels at different sites.
    """
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping):
        raise ValueError("dataset.json has no 'labels' mapping; add one with the AMOS names and ids")
    pairs: list[tuple[str, int]] = []
    for k, v in labels.items():
        if isinstance(v, (int, float)) or (isinstance(v, str) and v.isdigit() and not str(k).isdigit()):
            pairs.append((str(k), int(v)))
        elif str(k).isdigit():
            pairs.append((str(v), int(k)))
        else:
            raise ValueError(f"dataset.json field 'labels' entry {k!r}: {v!r} is a region; FedDAH needs plain AMOS ids")
    result: dict[int, Organ] = {}
    for name, label in pairs:
        if label == 0:
            continue
        o = organ(name)
        if o.label != label:
            raise ValueError(
                f"dataset.json field 'labels': {name!r} has id {label} but AMOS uses {o.label}; "
                f"relabel the dataset to AMOS ids (see nnunet_feddah.organs.ORGANS)"
            )
        result[label] = o
    return result


def annotated_organs(dataset_json: Mapping) -> tuple[Organ, ...]:
    """Organs a site actually annotates.

    A FedDAH site dataset declares all AMOS labels (nnU-Net needs consecutive ids) and lists the ones it
    annotates under ``dataset_json["feddah"]["annotated_organs"]``; without that key every declared
    label counts as annotated.
    """
    declared = organs_in_dataset_json(dataset_json)
    extra = dataset_json.get("feddah", {}).get("annotated_organs") if isinstance(dataset_json.get("feddah"), Mapping) else None
    if extra is None:
        return tuple(declared[k] for k in sorted(declared))
    chosen = [organ(x) for x in extra]
    missing = [o.key for o in chosen if o.label not in declared]
    if missing:
        raise ValueError(f"dataset.json field 'feddah.annotated_organs' lists {missing} which 'labels' does not declare")
    return tuple(sorted(chosen, key=lambda o: o.label))

