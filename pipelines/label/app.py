"""The MONAI Label app: the project's bundles, served under their folder names.

Imported by the ``main.py`` that :func:`pipelines.label.server.prepare_app` writes into the app
folder, in the MONAI Label environment (``make label-server``; pydicom 2, so this package's
pydicom-3-only code stays unimported). Each bundle under ``<app>/model/`` becomes one infer task
(MONAI Label's ``BundleInferTask``: the bundle's ``network_def``, ``preprocessing``, ``inferer``
and ``postprocessing``, minus ``SaveImaged``) and one train task (``BundleTrainTask``).

What this app changes in MONAI Label's bundle tasks:

- checkpoints load strictly: a ``model.pt`` that does not fit ``network_def`` is an error, where
  MONAI Label only warns and runs the unfitted layers;
- the image's path is set aside while the bundle's preprocessing runs (MONAI 1.6's ``Spacingd``
  would treat MONAI Label's ``image_path`` string as a metadata dict);
- a result whose image has no file extension (a DICOM series folder) is written as ``.nii.gz``,
  results are uint8 label maps unless the request asks for another ``result_dtype``, and a 2D
  bundle's ``(1, H, W)`` result is written as an ``(H, W)`` picture;
- training from annotations validates every epoch (so the best model, ``models/model.pt``, is
  written after the first epoch and the next inference uses it), validates on the training
  images when too few labels leave the validation split empty, and never resumes the bundle's
  own interrupted-run checkpoint (each MONAI Label training is a fresh fine-tuning run);
- a bundle trains only on the labelled images it takes (their headers' dimensions and channel
  count against its ``network_data_format``), the others named in the log: one datastore holds
  the cases of every bundle served (:func:`fitting_datalist`);
- a multi-parametric bundle (channels loaded under their own keys, aligned and stacked into
  ``image``) takes one multi-channel image per case, a 4D NIfTI of the channels in the bundle's
  order, for inference and training (:func:`stacked_channels`); its configs' references to the
  metadata (``@_meta_#...``) resolve, as under ``python -m monai.bundle run``; and its labels are the
  metadata's ``labels`` (the values of the label map it returns), not its output channels (regions);
- no dcmqi download at start (nothing may be fetched at run time): labels saved to a DICOMweb
  store, and ``/infer`` results asked for as ``dicom_seg``, are written as DICOM SEG by dcmqi's
  ``itkimage2segimage`` from the ``dcmqi`` wheel the environment installs (found beside its
  Python, or on ``PATH``; MONAI Label's own converter), or without it by pydicom-seg, the
  converter's other writer (:func:`use_coded_dicom_seg`);
- those SEGs carry the bundles' SNOMED CT codes (``dicom_seg_segments`` in ``metadata.json``), one
  segment per label value present, where MONAI Label codes every segment as the spleen and pairs
  names with values by position (:mod:`pipelines.label.seg_codes`); saved labels are marked
  ``SEMIAUTOMATIC``, ``/infer`` results ``AUTOMATIC``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from pipelines.inference.runtimes import bundle_runner, inferer_window, int8_for
from pipelines.io.hashing import content_hash
from pipelines.label.compat import provide_torchvision_utils
from pipelines.label.seg_codes import bundle_segments, segment_attributes
from pipelines.label.server import bundle_names
from pipelines.label.stacking import fitting_datalist, stacked_channels, stacked_training_transforms

provide_torchvision_utils()  # before monailabel.tasks.infer.bundle imports torchvision.utils

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402

import pipelines  # noqa: E402

__all__ = [
    "UNetBundleInferTask",
    "UNetBundleTrainTask",
    "UNetPipelinesApp",
    "use_coded_dicom_seg",
]

logger = logging.getLogger(__name__)

_DCMQI_TOOL = "itkimage2segimage"


def _with_metadata(parser, bundle_path: str):
    """MONAI Label parses a bundle's config without its metadata; configs that refer to it
    (``"$@_meta_#series_rules"``) need it, as ``python -m monai.bundle run`` gives it."""
    parser.read_meta(str(Path(bundle_path) / "configs" / "metadata.json"))
    return parser


class UNetBundleInferTask(BundleInferTask):
    """MONAI Label's bundle inference with strict weight loading and NIfTI results for DICOM folders;
    a multi-parametric bundle takes one multi-channel image (:func:`stacked_channels`)."""

    def __init__(self, path: str, conf: dict, **kwargs) -> None:
        super().__init__(path, conf, load_strict=True, **kwargs)
        import json

        # MONAI Label names the output channels; a region bundle's result holds the metadata's labels
        labels = json.loads((Path(path) / "configs" / "metadata.json").read_text()).get("labels")
        if labels:
            self.labels = {str(name): int(value) for value, name in labels.items()}
        # where the network runs on the CPU: the server's --runtime, else the bundle's `runtime` id;
        # refused at start (naming the bundle) when unusable, never left to fall back to torch
        self.runtime = str(conf.get("runtime") or self.bundle_config.get("runtime", "torch"))
        self._runner: tuple | None = None
        window = inferer_window(self.bundle_config.get_parsed_content("inferer"),  # a network built for int8 only
                                self.bundle_config.get_parsed_content("network_def")) \
            if self.runtime == "openvino-int8" else None
        int8_for(self.runtime, torch.device("cpu"), Path(path), content_hash(Path(path) / "models" / "model.pt"), None,
                 window)
        if self.runtime != "torch":
            logger.info("%s: the network runs on %s", Path(path).name, self.runtime)

    def _get_network(self, device, data):
        """The bundle's network with its weights (MONAI Label's, reloaded when the weights change), on
        the runtime: OpenVINO's model is made again for new weights; an int8 model made from other
        weights (after training from annotations) is refused by name."""
        network = super()._get_network(device, data)
        if network is None or self.runtime == "torch" or not str(device).startswith("cpu"):
            return network
        if self._runner is None or self._runner[0] is not network:
            self._runner = (network, bundle_runner(network, self.runtime, self.bundle_path, self.get_path(),
                                                   inferer=self.bundle_config.get_parsed_content("inferer")))
        return self._runner[1]

    def _load_bundle_config(self, path, config):
        return _with_metadata(super()._load_bundle_config(path, config), path)

    def pre_transforms(self, data=None):
        return stacked_channels(list(super().pre_transforms(data)))

    def run_pre_transforms(self, data: dict, transforms):
        # MONAI 1.6's Spacingd updates every "image_*" key of a NIfTI case with the image's metadata,
        # taking it for a meta dict; MONAI Label keeps the image's path, a str, in "image_path"
        path = data.pop("image_path", None)
        try:
            data = super().run_pre_transforms(data, transforms)
        finally:
            if path is not None:
                data["image_path"] = path
        return data

    def writer(self, data: dict, extension=None, dtype=None):
        image = str(data.get("image_path") or "")
        if extension is None and not data.get("result_extension") and Path(image).is_dir():
            extension = ".nii.gz"  # the series UID folder name would otherwise be taken for an extension
        pred = data.get(self.output_label_key)
        if self.dimension == 2 and pred is not None and pred.ndim == 3 and pred.shape[0] == 1:
            data[self.output_label_key] = pred[0]  # a 2D label map, not a one-pixel-thick volume
        if dtype is None and not data.get("result_dtype"):
            dtype = "uint8"  # label values, not MONAI Label's default float32 (4x the download)
        return super().writer(data, extension=extension, dtype=dtype)


class UNetBundleTrainTask(BundleTrainTask):
    """MONAI Label's bundle training, fitted to the project's ``train.json`` (see the module docstring)."""

    def __init__(self, path: str, conf: dict, **kwargs) -> None:
        super().__init__(path, conf, load_strict=True, **kwargs)

    def _load_bundle_config(self, path, config):
        return _with_metadata(super()._load_bundle_config(path, config), path)

    def _fetch_datalist(self, request, datastore):
        import json

        meta = json.loads((Path(self.bundle_path) / "configs" / "metadata.json").read_text())
        image = meta["network_data_format"]["inputs"]["image"]
        return fitting_datalist(super()._fetch_datalist(request, datastore), len(image["spatial_shape"]),
                                int(image["num_channels"]), Path(self.bundle_path).name)

    def _update_overrides(self, overrides: dict) -> dict:
        overrides["val_interval"] = 1
        overrides["resume"] = False
        channels = self.bundle_config.get("channels") or []
        stacked = stacked_training_transforms(self.bundle_config.get("deterministic_transforms") or [], channels)
        if stacked is not None:  # a multi-parametric bundle: MONAI Label's images hold the channels
            overrides["deterministic_transforms"] = stacked
        key = self.const.key_validate_dataset_data()
        if key in overrides and not overrides[key]:  # absent: val_split < 0 asks for the bundle's own list
            train = overrides[self.const.key_train_dataset_data()]
            logger.warning(
                "%s: the validation split of %d labelled images is empty: validating on the training images",
                Path(self.bundle_path).name, len(train),
            )
            overrides[key] = list(train)
        return overrides


class UNetPipelinesApp(MONAILabelApp):
    """Serves every bundle folder under ``<app_dir>/model`` (``--conf models a,b`` picks some)."""

    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        model_dir = Path(app_dir) / "model"
        found = bundle_names(model_dir)
        wanted = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        if wanted != ["all"]:
            unknown = sorted(set(wanted) - set(found))
            if unknown:
                raise ValueError(f"--conf models names bundles not in {model_dir}: {unknown} (there: {found})")
            found = [name for name in found if name in wanted]
        if not found:
            raise ValueError(f"no bundle (configs/metadata.json) under {model_dir}")
        self.bundles = {name: model_dir / name for name in found}
        self.segments = bundle_segments(self.bundles.values())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="unet-pipelines",
            description="U-Net bundles of unet-pipelines: " + ", ".join(found),
            version=pipelines.__version__,
        )

    def init_infers(self) -> dict:
        tasks = {name: UNetBundleInferTask(str(path), self.conf) for name, path in self.bundles.items()}
        return self._valid(tasks, "inference")

    def init_trainers(self) -> dict:
        tasks = {name: UNetBundleTrainTask(str(path), self.conf) for name, path in self.bundles.items()}
        return self._valid(tasks, "training")

    @staticmethod
    def _valid(tasks: dict, kind: str) -> dict:
        for name, task in tasks.items():
            if not task.is_valid():
                raise ValueError(f"bundle {name} cannot serve {kind} (see the warnings above)")
        return tasks

    def _download_dcmqi_tools(self) -> None:
        """Called when the datastore is a DICOMweb store: never download. dcmqi installed in this
        environment (beside its Python, not necessarily on ``PATH``) is put on ``PATH``, where MONAI
        Label's converter runs it; without dcmqi, use pydicom-seg."""
        beside = Path(sys.executable).parent
        if not shutil.which(_DCMQI_TOOL) and (beside / _DCMQI_TOOL).is_file():
            os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"
        dcmqi = bool(shutil.which(_DCMQI_TOOL) or (Path(self.app_dir) / "bin" / _DCMQI_TOOL).exists())
        if dcmqi:
            logger.info("DICOM SEGs are written by dcmqi's %s (%s)", _DCMQI_TOOL, shutil.which(_DCMQI_TOOL))
        use_coded_dicom_seg(self.segments, dcmqi=dcmqi)
        if not dcmqi:
            logger.info("dcmqi's %s is not on PATH: DICOM SEGs are written with pydicom-seg", _DCMQI_TOOL)


def use_coded_dicom_seg(segments: list[dict], dcmqi: bool = False) -> None:
    """Make MONAI Label write DICOM SEGs with the bundles' codes, and with pydicom-seg unless ``dcmqi``.

    MONAI Label's converter (``nifti_to_dicom_seg``) has both writers but its DICOMweb datastore
    (saving a final label) and its ``/infer?output=dicom_seg`` always ask for dcmqi, a binary it
    downloads at start-up. The two modules' references to the converter are replaced by ones that
    first describe each label value present (:func:`pipelines.label.seg_codes.segment_attributes`).

    Args:
        segments: :func:`pipelines.label.seg_codes.bundle_segments` of the served bundles.
        dcmqi: whether dcmqi's ``itkimage2segimage`` is available.
    """
    import functools

    import monailabel.datastore.dicom as datastore
    import monailabel.endpoints.infer as infer_endpoint
    import numpy as np
    import SimpleITK
    from monailabel.datastore.utils import convert

    def coded(algorithm_type: str):
        @functools.wraps(convert.nifti_to_dicom_seg)
        def nifti_to_dicom_seg(series_dir, label, label_info, file_ext="*", use_itk=True) -> str:
            values = np.unique(SimpleITK.GetArrayViewFromImage(SimpleITK.ReadImage(str(label))))
            info = segment_attributes(values, label_info, segments, algorithm_type)
            return convert.nifti_to_dicom_seg(series_dir, label, info, file_ext=file_ext, use_itk=use_itk and dcmqi)

        return nifti_to_dicom_seg

    datastore.nifti_to_dicom_seg = coded("SEMIAUTOMATIC")
    infer_endpoint.nifti_to_dicom_seg = coded("AUTOMATIC")
