"""The outputs of a case: each reads what an earlier one provides, and a list in the wrong order is
refused before any case, naming both outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipelines.batch.outputs import (
    DicomSegOutput,
    DicomSrOutput,
    MeasuresOutput,
    QcOutput,
    check_order,
    default_outputs,
)
from pipelines.batch.records import Records
from pipelines.batch.remote.endpoint import Endpoint

MODEL = SimpleNamespace(labels={1: "tumor", 2: "edema"}, regions={}, lesion_labels=[1], name="unet3d_tumor", version="1",
                        segments=None, weights_sha256="0" * 64, lesion_scoring={}, enhancing_labels=[1],
                        non_enhancing_labels=None, qc_inputs=[], input_keys=("image",))


@pytest.mark.parametrize("options", [{}, {"probabilities": True, "rtstruct": True},
                                     {"push": Endpoint.parse("dicom://PACS@127.0.0.1:104")}])
def test_the_default_outputs_come_in_an_order_that_reads_nothing_too_early(tmp_path, options):
    outputs = default_outputs(MODEL, output=tmp_path, **options)
    check_order(outputs)
    names = [type(o).__name__ for o in outputs]
    assert names.index("MeasuresOutput") < names.index("ComparisonOutput") < names.index("RanoOutput") \
        < names.index("DicomSegOutput") < names.index("DicomSrOutput") < names.index("PushOutput")


def test_an_output_before_what_it_reads_is_refused_by_name(tmp_path):
    sr = DicomSrOutput(None, MODEL.labels, None, "u", "1", "0" * 64)
    seg = DicomSegOutput(None, "u", "1")
    with pytest.raises(ValueError, match="DicomSrOutput reads seg, which DicomSegOutput provides after it"):
        check_order([MeasuresOutput(MODEL.labels), sr, seg])
    with pytest.raises(ValueError, match="QcOutput reads measures"):
        Records(tmp_path, [QcOutput(), MeasuresOutput(MODEL.labels)], {}, "image")
    check_order([MeasuresOutput(MODEL.labels), seg, sr, QcOutput()])


def test_a_server_is_told_apart_once():
    web = Endpoint.parse("https://pacs.example.org/dicom-web")
    peer = Endpoint.parse("dicom://PACS@10.0.0.5:104/")
    assert (web.kind, web.url, web.peer) == ("dicomweb", "https://pacs.example.org/dicom-web", None)
    assert (peer.kind, peer.url, peer.peer.aet, peer.peer.port) == ("dimse", "dicom://PACS@10.0.0.5:104", "PACS", 104)
    assert Endpoint.parse("/data/studies") is None and Endpoint.parse("cases.json") is None
    with pytest.raises(ValueError, match="dicom://AET@host:port"):
        Endpoint.parse("dicom://10.0.0.5:104")
