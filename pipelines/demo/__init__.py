"""The embedded demo data: synthetic tumor cases on the MNI152 anatomy that nilearn ships."""

from pipelines.demo.dataset import DEFAULT_SPLIT, write_demo_data, write_dicom_series
from pipelines.demo.synthetic import LABELS, load_template, make_case

__all__ = ["DEFAULT_SPLIT", "LABELS", "load_template", "make_case", "write_demo_data", "write_dicom_series"]
