from __future__ import annotations

import json

import pytest

from pipelines.label.seg_codes import GENERIC_CODE, bundle_segments, segment_attributes
from tests.conftest import REPO

BUNDLES = REPO / "bundles"


@pytest.fixture(scope="module")
def segments():
    return bundle_segments([BUNDLES / "unet3d_tumor", BUNDLES / "unet2d_isbi2012"])


def codes(entry: dict) -> tuple[str, str, str]:
    attribute = entry["segmentAttribute"]
    return (attribute["labelID"], attribute["SegmentedPropertyCategoryCodeSequence"]["CodeValue"],
            attribute["SegmentedPropertyTypeCodeSequence"]["CodeValue"])


def test_served_bundles_give_their_snomed_codes(segments):
    tumor = json.loads((BUNDLES / "unet3d_tumor" / "configs" / "metadata.json").read_text())["dicom_seg_segments"]
    assert [(s.label, s.name) for s in segments] == [(e["label"], e["name"]) for e in tumor]  # the EM bundle has none
    info = segment_attributes([0, 1, 2], [{"name": "tumor", "idx": 1, "color": [255, 0, 0]}, {"name": "edema", "idx": 2}],
                              segments, "SEMIAUTOMATIC")
    assert [codes(e) for e in info] == [(1, "49755003", "108369006"), (2, "49755003", "79654002")]
    first = info[0]["segmentAttribute"]
    assert first["SegmentLabel"] == "tumor" and first["SegmentAlgorithmType"] == "SEMIAUTOMATIC"
    assert first["SegmentAlgorithmName"] == "unet-pipelines" and first["recommendedDisplayRGBValue"] == [255, 0, 0]
    assert len(info[1]["segmentAttribute"]["recommendedDisplayRGBValue"]) == 3


def test_each_value_present_gets_its_own_description(segments):
    """No tumor voxels: MONAI Label would give edema (the first value present) the first entry, tumor."""
    info = segment_attributes([0, 2], [{"name": "tumor", "idx": 1}, {"name": "edema", "idx": 2}], segments)
    assert [(e["name"], *codes(e)) for e in info] == [("edema", 2, "49755003", "79654002")]
    # without names or idx, the label value picks the segment; a value no bundle describes is tissue
    info = segment_attributes([3, 1, 0, 1], None, segments)
    assert [e["name"] for e in info] == ["tumor", "label 3"]
    assert codes(info[1]) == (3, GENERIC_CODE[0], GENERIC_CODE[0])
    # entries without idx pair with the values present in order, as MONAI Label pairs them
    info = segment_attributes([2], [{"name": "Edema"}], segments, "MANUAL")
    assert codes(info[0]) == (2, "49755003", "79654002") and "SegmentAlgorithmName" not in info[0]["segmentAttribute"]
    assert segment_attributes([0], [{"name": "tumor", "idx": 1}], segments) == []


def test_bundles_disagreeing_on_a_value_need_a_name(tmp_path, segments):
    other = tmp_path / "liver"
    (other / "configs").mkdir(parents=True)
    (other / "configs" / "metadata.json").write_text(json.dumps({"dicom_seg_segments": [
        {"label": 1, "name": "liver", "category": ["123037004", "SCT", "Anatomical Structure"],
         "type": ["10200004", "SCT", "Liver"]}]}))
    both = segments + bundle_segments([other])
    assert codes(segment_attributes([1], None, both)[0]) == (1, GENERIC_CODE[0], GENERIC_CODE[0])
    assert codes(segment_attributes([1], [{"name": "liver", "idx": 1}], both)[0]) == (1, "123037004", "10200004")


def test_bad_input_is_refused_clearly(tmp_path, segments):
    with pytest.raises(ValueError, match="algorithm_type must be one of"):
        segment_attributes([1], None, segments, "automatic")
    bad = tmp_path / "bad"
    (bad / "configs").mkdir(parents=True)
    (bad / "configs" / "metadata.json").write_text(json.dumps({"dicom_seg_segments": [{"label": 1, "name": "x"}]}))
    with pytest.raises(ValueError, match=r"metadata.json: a dicom_seg_segments entry must have"):
        bundle_segments([bad])
    (bad / "configs" / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"metadata.json: unreadable bundle metadata"):
        bundle_segments([bad])
