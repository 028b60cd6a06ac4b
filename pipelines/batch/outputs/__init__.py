"""What the batch job writes for a segmented case: a list of small outputs, one module each, each
adding its files to the case folder and its typed results to :class:`CaseOutput`. A new output (an
RTSTRUCT) joins by being added to the list :func:`default_outputs` makes; the list's order is the
order they write in and the order of their fields in ``record.json``.

Every file is written under a temporary name and renamed when complete; ``record.json``, written
last from the outputs' results by :class:`pipelines.batch.records.Records`, lists the files of a
complete case.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pipelines.batch.outputs.base import (
    DICOM_OUTPUTS,
    OUTPUT_FILES,
    CaseOutput,
    Grid,
    Output,
    Scores,
    Segmented,
    check_order,
)
from pipelines.batch.outputs.brain_mask import BrainMaskOutput
from pipelines.batch.outputs.comparison import ComparisonOutput
from pipelines.batch.outputs.mask import MaskOutput
from pipelines.batch.outputs.measurements import MeasuresOutput
from pipelines.batch.outputs.page import CasePageOutput
from pipelines.batch.outputs.probabilities import ProbabilityOutput
from pipelines.batch.outputs.push import PushOutput
from pipelines.batch.outputs.qc import QcOutput
from pipelines.batch.outputs.rano import RanoOutput
from pipelines.batch.outputs.rtstruct import RtstructOutput
from pipelines.batch.outputs.scores import DiceOutput
from pipelines.batch.outputs.seg import DicomSegOutput
from pipelines.batch.outputs.sr import DicomSrOutput
from pipelines.batch.remote.endpoint import Endpoint
from pipelines.batch.remote.retry import RetryPolicy
from pipelines.batch.viewer import viewer_script

__all__ = [
    "DICOM_OUTPUTS", "OUTPUT_FILES", "BrainMaskOutput", "CaseOutput", "CasePageOutput", "ComparisonOutput", "DiceOutput", "DicomSegOutput",
    "DicomSrOutput", "Grid", "MaskOutput", "MeasuresOutput", "Output", "ProbabilityOutput", "PushOutput", "QcOutput",
    "RanoOutput", "RtstructOutput", "Scores", "Segmented", "check_order", "default_outputs",
]

logger = logging.getLogger(__name__)


def default_outputs(model, probabilities: bool = False, push: Endpoint | None = None, rtstruct: bool = False,
                    calling_aet: str = "UNETPIPELINES", output: Path | None = None,
                    prior: Sequence[Path] = (), retry: RetryPolicy | None = None, case_pages: bool = True) -> list[Output]:
    """The batch job's outputs for ``model`` (a :class:`~pipelines.batch.bundle.BundleModel`), in order;
    ``output`` (the run's folder) and ``prior`` (earlier runs' folders) for the comparison with prior
    studies and the case pages (none without ``output``, or with ``case_pages`` False; without NiiVue,
    said once); ``push`` where to store the DICOM outputs, ``retry`` how."""
    script = viewer_script() if output is not None and case_pages else None
    if output is not None and case_pages and script is None:
        logger.warning("no case pages: NiiVue is not installed (run `make web-deps`, or set UNET_NIIVUE_JS to its "
                       "niivue.umd.js)")
    outputs: list[Output] = [MaskOutput(), BrainMaskOutput()]
    if probabilities:
        outputs.append(ProbabilityOutput())
    outputs += [
        MeasuresOutput(model.labels, model.regions, model.lesion_labels),
        *([ComparisonOutput(output, prior, model.lesion_labels, model.regions, model.name)] if output is not None else []),
        *([RanoOutput(model.enhancing_labels, model.labels, model.non_enhancing_labels)] if model.enhancing_labels else []),
        DicomSegOutput(model.segments, model.name, model.version, model.regions),
        DicomSrOutput(model.segments, model.labels, model.regions, model.name, model.version, model.weights_sha256),
        *([RtstructOutput(model.segments, model.name, model.version)] if rtstruct else []),
        PushOutput(push, calling_aet, retry),
        QcOutput(model.qc_inputs),
        *([CasePageOutput(output, script, model.labels, model.name, _page_inputs(model))] if script is not None else []),
        DiceOutput(model.labels, model.regions, model.lesion_scoring),
    ]
    return outputs


def _page_inputs(model) -> list[str]:
    """The inputs a case page shows: the QC picture's first, then the bundle's others; none (the
    reference image as loaded) for a bundle whose QC picture shows that."""
    shown = list(model.qc_inputs)
    return shown + [key for key in model.input_keys if key not in shown] if shown else []
