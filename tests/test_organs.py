"""Organ catalogue and task parsing: AMOS ids, AMOS spellings, stable task keys, clear errors."""

import pytest

from nnunet_feddah.organs import (
    ORGANS,
    Task,
    UnknownOrganError,
    annotated_organs,
    organ,
    organs_in_dataset_json,
)

AMOS_DATASET_JSON_LABELS = {  # exactly as in AMOS22's own dataset.json (id -> name, with its typo)
    "0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
    "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
    "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
    "15": "prostate/uterus",
}


def test_catalogue_has_the_15_amos_ids_in_order():
    assert [o.label for o in ORGANS] == list(range(1, 16))
    assert organ(8).key == "aorta" and organ(8).amos_spelling == "arota"
    assert organ(9).key == "postcava" and organ("IVC") is organ(9)


def test_amos_dataset_json_maps_cleanly_in_both_label_layouts():
    by_id = organs_in_dataset_json({"labels": AMOS_DATASET_JSON_LABELS})
    by_name = organs_in_dataset_json({"labels": {v: int(k) for k, v in AMOS_DATASET_JSON_LABELS.items()}})
    assert by_id == by_name
    assert {k: o.key for k, o in by_id.items()}[8] == "aorta"
    assert len(by_id) == 15


def test_dataset_json_with_non_amos_ids_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="'labels'.*liver.*id 3.*AMOS uses 6"):
        organs_in_dataset_json({"labels": {"background": 0, "liver": 3}})


@pytest.mark.parametrize("spec", ["kidneys", "right_kidney+left_kidney", "Right Kidney + left-kidney",
                                  ["rk", "lk"], [2, 3]])
def test_task_keys_are_stable(spec):
    task = Task.parse(spec)
    assert task.key == "kidneys"
    assert task.labels == (2, 3)
    assert task.nnunet_labels() == {"background": 0, "right kidney": 1, "left kidney": 2}


def test_task_order_defines_the_output_channels():
    task = Task.parse("liver+spleen")
    assert task.key == "liver+spleen"
    lut = task.amos_to_task_lut()
    assert lut[6] == 1 and lut[1] == 2 and lut[2] == 0
    assert Task.parse("spleen+liver").key != task.key


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownOrganError, match="unknown organ 'kidnee'.*right_kidney.*groups: kidneys"):
        Task.parse("kidnee")
    with pytest.raises(UnknownOrganError, match="label id 16"):
        organ(16)
    with pytest.raises(UnknownOrganError, match="twice"):
        Task.parse("liver+liver")


def test_annotated_organs_reads_the_feddah_block():
    labels = {v: int(k) for k, v in AMOS_DATASET_JSON_LABELS.items()}
    assert len(annotated_organs({"labels": labels})) == 15
    partial = annotated_organs({"labels": labels, "feddah": {"annotated_organs": [6, 2, 3]}})
    assert [o.key for o in partial] == ["right_kidney", "left_kidney", "liver"]
    with pytest.raises(ValueError, match="feddah.annotated_organs"):
        annotated_organs({"labels": {"background": 0, "liver": 6}, "feddah": {"annotated_organs": [2]}})
